"""Named model configs: the four Hugging Face GPT-2 sizes and a few CPU-sized ones."""
from __future__ import annotations

from typing import Callable, Optional

from .model import GPT_CONFIG_124M
from ..errors import ConfigError, did_you_mean

# Hugging Face GPT-2: qkv bias, tanh-approximated GELU, learned positions, tied head. The GPU-sized
# presets pad the 50257-row vocabulary to 50304 (a multiple of 64) so the head's matmul is aligned.
_HF_GPT2 = dict(GPT_CONFIG_124M, qkv_bias=True, activation="gelu_tanh", vocab_multiple=64)

PRESETS: dict[str, dict] = {
    "gpt2": dict(_HF_GPT2),
    "gpt2-medium": dict(_HF_GPT2, emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": dict(_HF_GPT2, emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": dict(_HF_GPT2, emb_dim=1600, n_heads=25, n_layers=48),
    # CPU-sized, byte-level vocabulary (256 tokens).
    "nano": dict(vocab_size=256, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0),
    "micro": dict(vocab_size=256, context_length=128, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0),
    # nanoGPT's shakespeare-char size: 6 layers x 384 wide, 256 tokens of context.
    "mini": dict(vocab_size=256, context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.2),
}


def apply_preset(model: dict, read_hf: Optional[Callable[[str], dict]] = None) -> dict:
    """Model keys with ``preset: NAME`` replaced by that preset's keys, and ``from_hf: DIR`` by
    the keys that checkpoint's config.json describes (the keys written beside either win).

    ``read_hf(DIR)`` gives those keys: the caller binds it to the plugin system whose importers
    read the checkpoint (gptlab.hf.checkpoint.hf_model_config), called only when there is a ``from_hf``.
    """
    model = dict(model)
    name = model.pop("preset", None)
    source = model.get("from_hf")
    if source is not None:
        if name is not None:
            raise ConfigError(f"model: set preset ({name}) or from_hf ({source}), not both")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"model.from_hf must be a checkpoint directory path, got {source!r}")
        if read_hf is None:
            raise ConfigError(f"model.from_hf ({source}) is read by an importer plugin, and none was given here; "
                              f"use it in an experiment or with GPTModel.from_hf")
        return {**read_hf(source), **model}
    if name is None:
        return model
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'{did_you_mean(str(name), PRESETS)}; presets: {', '.join(PRESETS)}")
    return {**PRESETS[name], **model}
