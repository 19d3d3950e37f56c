"""Corpora and tokenizers (text: the base classes plugins subclass) and the verified token cache
and batch sampling of a run (tokens)."""
