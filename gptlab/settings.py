"""Strict, typed sections of an experiment besides the model: ``data`` and ``train``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from .config import ComponentSpec
from .errors import ConfigError, did_you_mean


@dataclass
class DataConfig:
    """Which corpus and tokenizer, and how much of it is held out for validation."""

    dataset: ComponentSpec = field(default_factory=lambda: ComponentSpec("python_docs"))
    tokenizer: ComponentSpec = field(default_factory=lambda: ComponentSpec("bytes"))
    val_fraction: float = 0.1


@dataclass
class TrainConfig:
    """Optimisation, evaluation and logging settings for one run."""

    steps: int = 200
    batch_size: int = 16
    seq_len: Optional[int] = None  # None: model.context_length
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: lr / 10 at the end of the cosine
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: Optional[float] = 1.0  # null or 0 turns clipping off
    eval_every: int = 50
    eval_batches: int = 8
    eval_lengths: list = field(default_factory=list)  # extra eval lengths as multiples of seq_len
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False
    checkpoint: bool = False  # save model.safetensors at the end


_POSITIVE = {"steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "seq_len"}


def parse_section(cls: type, values: Any, section: str) -> Any:
    """Build a settings dataclass from a mapping, naming the key on any unknown key or bad type."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"unknown {section} key '{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    out = cls(**kwargs)
    for key in _POSITIVE & set(valid):
        v = getattr(out, key)
        if v is not None and v <= 0:
            raise ConfigError(f"{section}.{key} must be a positive integer, got {v}")
    if isinstance(out, TrainConfig):
        _check_train(out)
    if isinstance(out, DataConfig) and not 0.0 < out.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1 (exclusive), got {out.val_fraction}")
    return out


def _check_train(t: TrainConfig) -> None:
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    for m in t.eval_lengths:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0:
            raise ConfigError(f"train.eval_lengths holds multiples of seq_len (e.g. [1, 2, 4]), got {m!r}")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if hint is ComponentSpec:
        return ComponentSpec.parse(value, key)
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    return value  # pragma: no cover


def section_to_dict(obj: Any) -> dict:
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = v.to_plain() if isinstance(v, ComponentSpec) else v
    return out
