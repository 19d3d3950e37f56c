"""gptlab: a plugin-based experiment registry for GPT architecture variants."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import GPT_CONFIG_124M, ComponentSpec, ModelConfig
from .errors import ConfigError, GptlabError, IncompatibleComponents, PluginError
from .hookspecs import hookimpl
from .model import GPTModel
from .plugin_manager import PluginSystem, build_plugin_system, default_plugins
from .presets import PRESETS

__all__ = [
    "GPTModel", "GPT_CONFIG_124M", "PRESETS", "ModelConfig", "ComponentSpec", "hookimpl",
    "PluginSystem", "build_plugin_system", "default_plugins",
    "GptlabError", "ConfigError", "PluginError", "IncompatibleComponents", "load_results",
]


def load_results(*paths):
    """Read run directories into a pandas DataFrame (one row per run); see ``gptlab.results``."""
    from .results import load_results as _load

    return _load(*paths)
