"""The model config: the seed's GPT_CONFIG_124M keys plus component choices, strictly checked.

Unknown keys and wrong types fail here, with the key named and the closest valid key suggested,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Union

from .errors import ConfigError, did_you_mean

# The seeds' configuration, unchanged (public API).
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

COMPONENT_KINDS = ("attention", "position", "norm", "norm_placement", "activation")


@dataclass(frozen=True)
class ComponentSpec:
    """A component choice: a registered name plus that component's options."""

    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, key: str) -> "ComponentSpec":
        if isinstance(value, ComponentSpec):
            return value
        if isinstance(value, str) and value:
            return cls(value, {})
        if isinstance(value, Mapping):
            value = dict(value)
            name = value.pop("name", None)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{key}: a mapping needs a 'name' key, e.g. {{name: ..., <options>}}")
            return cls(name, value)
        raise ConfigError(f"{key}: expected a component name or {{name: ..., <options>}}, got {value!r}")

    def to_plain(self) -> Union[str, dict]:
        return dict(name=self.name, **self.options) if self.options else self.name


@dataclass
class ModelConfig:
    """Everything that defines a model. Defaults reproduce the seeds' GPT-124M (tied head), except that
    `gelu` is the exact GELU; the seeds' hand-written one is `gelu_tanh`."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    attention: ComponentSpec = field(default_factory=lambda: ComponentSpec("sdpa"))
    position: ComponentSpec = field(default_factory=lambda: ComponentSpec("learned"))
    norm: ComponentSpec = field(default_factory=lambda: ComponentSpec("layernorm"))
    norm_placement: ComponentSpec = field(default_factory=lambda: ComponentSpec("pre"))
    activation: ComponentSpec = field(default_factory=lambda: ComponentSpec("gelu"))
    ff_dim: Union[int, None] = None  # None: 4 * emb_dim (gated MLPs: 2/3 of that, parameter-matched)
    bias: bool = True  # biases of the non-qkv linears and of the norms
    tie_embeddings: bool = True
    gradient_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_plain() if isinstance(v, ComponentSpec) else v
        return out

    @classmethod
    def from_any(cls, cfg: Any) -> "ModelConfig":
        """Build from a dict, an OmegaConf config or a ModelConfig, checking every key and type."""
        if isinstance(cfg, ModelConfig):
            cfg = cfg.to_dict()  # re-check: a dataclass can be built with any values
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"model config must be a mapping, got {type(cfg).__name__}")
        valid = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in cfg.items():
            if key not in valid:
                raise ConfigError(f"unknown model key '{key}'{did_you_mean(key, valid)}; "
                                  f"valid keys: {', '.join(valid)}")
            kwargs[key] = _check_type(key, value)
        out = cls(**kwargs)
        out.validate()
        return out

    def validate(self) -> None:
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.emb_dim % self.n_heads:
            raise ConfigError(f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.ff_dim is not None and self.ff_dim <= 0:
            raise ConfigError(f"model.ff_dim must be a positive integer or null, got {self.ff_dim}")


_INT_KEYS = {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"}
_BOOL_KEYS = {"qkv_bias", "bias", "tie_embeddings", "gradient_checkpointing"}


def _check_type(key: str, value: Any) -> Any:
    if key in COMPONENT_KINDS:
        return ComponentSpec.parse(value, f"model.{key}")
    if key in _INT_KEYS or key == "ff_dim":
        if key == "ff_dim" and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"model.{key} must be an integer, got {value!r}")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"model.{key} must be true or false, got {value!r}")
        return value
    if key == "drop_rate":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"model.drop_rate must be a number, got {value!r}")
        return float(value)
    return value  # pragma: no cover - every field is covered above
