"""What dataset and tokenizer plugins return. No torch: a tokenizer is plain Python."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Corpus:
    """A text source: ``fingerprint`` changes whenever the text would."""

    fingerprint: str
    read: Callable[[], str]


class Tokenizer:
    """Base class for tokenizers; ``fit`` and the state methods are no-ops for fixed vocabularies."""

    vocab_size: int = 0

    def fit(self, text: str) -> None:
        """Build a vocabulary from the training text (only data-dependent tokenizers need it)."""

    def encode(self, text: str) -> list[int]:
        """Text -> token ids: every tokenizer plugin writes this."""
        raise NotImplementedError(f"tokenizer {type(self).__name__} must define encode(text)")

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text: every tokenizer plugin writes this."""
        raise NotImplementedError(f"tokenizer {type(self).__name__} must define decode(ids)")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``fit`` learned."""
