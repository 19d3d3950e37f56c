"""What dataset and tokenizer plugins return: ``Corpus`` and ``Tokenizer``. They are part of the
plugin contract and live in ``gptlab.plugin.contract`` (this layer sits above it); they are
re-exported here, where the data pipeline uses them. No torch: a tokenizer is plain Python."""
from __future__ import annotations

from ..plugin.contract import Corpus, Tokenizer

__all__ = ["Corpus", "Tokenizer"]
