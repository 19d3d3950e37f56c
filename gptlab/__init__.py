"""gptlab: a plugin-based experiment registry for GPT architecture variants.

The public API is importable from here. Names backed by torch (the model, the base classes
plugins subclass) load on first use, so ``import gptlab`` and the commands that only read
results stay fast. The README's "How the code is laid out" maps the modules.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from .errors import ConfigError, GptlabError, IncompatibleComponents, PluginError
from .hookspecs import KINDS, Range, RunInfo, hookimpl

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GPT_CONFIG_124M": "config", "ModelConfig": "config", "ComponentSpec": "config",
    "PRESETS": "presets",
    "PluginSystem": "plugin_manager", "build_plugin_system": "plugin_manager", "default_plugins": "plugin_manager",
    "GPTModel": "model",
    # what plugins subclass or return
    "CausalSelfAttention": "layers", "MLP": "layers", "GatedMLP": "layers",
    "PositionScheme": "components", "PositionalContext": "components", "KVCache": "components",
    "mark_residual": "components",
    "Corpus": "text", "Tokenizer": "text",
    "HFImport": "hf",
    "load_results": "results",
}

__all__ = ["__version__", "ConfigError", "GptlabError", "IncompatibleComponents", "PluginError", "KINDS", "Range",
           "RunInfo", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gptlab' has no attribute '{name}'")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
