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
from .plugin.hookspecs import KINDS, Range, RunInfo, hookimpl

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GPT_CONFIG_124M": "config.model", "ModelConfig": "config.model", "ComponentSpec": "config.model",
    "PRESETS": "config.presets",
    "PluginSystem": "plugin.manager", "build_plugin_system": "plugin.manager", "default_plugins": "plugin.manager",
    "GPTModel": "model.gpt",
    # the plugin contract (gptlab.plugin.contract documents each kind): what plugins subclass, return,
    # receive and call
    "CausalSelfAttention": "plugin.layers", "FlexAttention": "plugin.layers", "MLP": "plugin.layers", "GatedMLP": "plugin.layers",
    "PositionScheme": "plugin.components", "Wiring": "plugin.components", "PositionalContext": "plugin.components", "KVCache": "plugin.components",
    "mark_residual": "plugin.components", "aux_loss": "plugin.components", "aux_metric": "plugin.components",
    "Norm": "plugin.contract", "Block": "plugin.contract", "FeedForward": "plugin.contract",
    "Tracker": "plugin.contract", "Corpus": "plugin.contract", "Tokenizer": "plugin.contract",
    "HFImport": "plugin.contract", "Optimizer": "plugin.contract", "ParamInfo": "plugin.contract",
    "Schedule": "plugin.contract", "ROLES": "plugin.contract", "param_groups": "train.recipe",
    "TrainConfig": "config.run", "per_head_rows": "plugin.contract", "data_path": "plugin.contract", "file_stamp": "plugin.contract", "Eval": "plugin.contract", "fused_rows": "plugin.contract",
    "HFConfig": "hf.helpers", "HFExport": "hf.helpers", "component": "hf.helpers", "rope_to_hf": "hf.helpers",
    "MAX_WIDTH": "hf.helpers",
    "require": "run.tracking", "row_metrics": "run.tracking", "final_metrics": "run.tracking",
    "grad_norms": "run.tracking", "flat_config": "run.tracking", "number": "run.tracking",
    "metric_key": "run.tracking", "Background": "run.tracking", "RunSlots": "run.tracking",
    "load_results": "results.frame",
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
