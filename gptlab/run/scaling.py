"""Scaling ladders: the experiment's ``scale:`` block.

Every variant trains at several model sizes, each size for a token budget from one rule (a number
of tokens per parameter of the baseline at that size, or a list of budgets), so each variant's loss
can be fitted against its training compute and compared with the baseline's as a compute
multiplier (``gptlab.results.ladder``). A size is a preset name or a mapping of model keys (with an
optional ``name``); the variants' own model keys are merged under it, the size's keys win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError, did_you_mean
from ..config.presets import PRESETS
from ..config.run import check_block

SCALE_KEYS = ("sizes", "tokens_per_param", "tokens", "baseline")
#: a power law with an irreducible term, E + A C^-alpha, has three parameters
MIN_SIZES = 3
#: Chinchilla's compute-optimal ratio (Hoffmann et al. 2022)
DEFAULT_TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class ScaleConfig:
    """The ``scale:`` block: the sizes (name -> model keys), the token rule and the baseline variant."""

    sizes: list  # [(name, model keys)]
    tokens_per_param: Optional[float]
    tokens: Optional[list]
    baseline: Optional[str]
    #: filled by the loader: per size, {name, parameters (the baseline's), tokens, steps}
    resolved: list = field(default_factory=list)

    def budget(self, index: int, parameters: int) -> float:
        """The tokens size ``index`` trains on, its baseline having ``parameters`` parameters."""
        return float(self.tokens[index]) if self.tokens is not None else self.tokens_per_param * parameters


def parse_scale(raw: Any, where: str) -> Optional[ScaleConfig]:
    """The checked ``scale:`` block, or None when the experiment has none."""
    if raw is None:
        return None
    example = "scale: {sizes: [nano, micro, mini], tokens_per_param: 20}"
    check_block(raw, "scale", SCALE_KEYS, example, where)
    sizes = raw.get("sizes")
    if not isinstance(sizes, list):
        raise ConfigError(f"{where}: scale.sizes must list model sizes (preset names or mappings of model keys "
                          f"such as {{emb_dim: 64, n_layers: 4, n_heads: 4}}), e.g. {example}")
    if len(sizes) < MIN_SIZES:
        raise ConfigError(f"{where}: scale.sizes lists {len(sizes)} size(s); a ladder needs at least {MIN_SIZES}: "
                          f"the fit of loss against compute, E + A C^-alpha, has three parameters")
    named = [_size(s, i, where) for i, s in enumerate(sizes)]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: scale.sizes names a size twice ({', '.join(names)}); give each a distinct name")
    per_param, tokens = raw.get("tokens_per_param"), raw.get("tokens")
    if per_param is not None and tokens is not None:
        raise ConfigError(f"{where}: scale: give tokens_per_param or tokens (one budget per size), not both")
    if tokens is not None:
        if not isinstance(tokens, list) or len(tokens) != len(sizes) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in tokens):
            raise ConfigError(f"{where}: scale.tokens must list one positive token budget per size "
                              f"({len(sizes)}), got {tokens!r}")
    elif per_param is None:
        per_param = DEFAULT_TOKENS_PER_PARAM
    if per_param is not None and (not isinstance(per_param, (int, float)) or isinstance(per_param, bool)
                                  or per_param <= 0):
        raise ConfigError(f"{where}: scale.tokens_per_param must be a number > 0, got {per_param!r}")
    baseline = raw.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise ConfigError(f"{where}: scale.baseline must be a variant name, got {baseline!r}")
    return ScaleConfig(named, float(per_param) if per_param is not None else None, tokens, baseline)


def _size(raw: Any, index: int, where: str) -> tuple[str, dict]:
    if isinstance(raw, str):
        if raw not in PRESETS:
            raise ConfigError(f"{where}: scale.sizes[{index}]: unknown preset '{raw}'{did_you_mean(raw, PRESETS)}; "
                              f"presets: {', '.join(PRESETS)}")
        return raw, {"preset": raw}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: scale.sizes[{index}] must be a preset name or a mapping of model keys, "
                          f"e.g. {{emb_dim: 64, n_layers: 4, n_heads: 4}}, got {raw!r}")
    keys = dict(raw)
    name = keys.pop("name", None)
    if name is None:
        name = "-".join(f"{k.split('_')[-1][0]}{v}" for k, v in keys.items())  # {emb_dim: 64, n_layers: 4}: d64-l4
    if not isinstance(name, str) or not name or any(c in name for c in "/\\,=") or name.startswith((".", "-")):
        raise ConfigError(f"{where}: scale.sizes[{index}]: name {name!r} cannot label a size; use letters, "
                          f"digits, _ . -")
    return name, keys


def size_label(variant: str, size: str) -> str:
    """The label of a variant's runs at one size, e.g. ``swiglu,size=micro``."""
    return f"{variant},size={size}"
