"""Hugging Face checkpoints: import and export through the importer plugins (checkpoint) and the
helpers importers use to translate configs and tensors (helpers). Families live in plugins/."""
