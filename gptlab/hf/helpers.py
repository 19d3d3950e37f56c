"""What every importer plugin needs to read and write Hugging Face config.json files.

``HFConfig`` reads keys with the defaults transformers itself assumes (so a sparse config.json
means what it means to transformers) and refuses, naming the key, any value gptlab would have
to ignore. ``HFExport`` is the other direction: it checks a gptlab model config against what a
family can express and names the component it cannot. ``HFImport``, ``fused_rows`` and
``per_head_rows`` are in ``gptlab.plugin.contract``; every helper an importer uses is
``gptlab.<name>`` too (``gptlab.plugin.contract.HELPERS["importer"]`` lists them). Nothing here
imports torch.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Optional

from ..config.model import MAX_LAYERS, count
from ..errors import ConfigError

#: the widest dimension an importer reads (hidden size, MLP width, heads, heads x head size): its
#: row maps are Python lists that long, and no published model comes within a tenth of it
MAX_WIDTH = 2 ** 20


def shown(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, so a hostile value keeps an error to one short line."""
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) else count(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def finite(value: Any) -> bool:
    """A number that is neither inf, nan nor an integer too large for a float (JSON allows any)."""
    return math.isfinite(value) if isinstance(value, float) else abs(value) < 2 ** 1000


def shown_json(value: Any, width: int = 60) -> str:
    """``value`` as JSON (true, null), cut like ``shown``."""
    text = json.dumps(value) if not isinstance(value, int) or isinstance(value, bool) else count(value)
    return text if len(text) <= width else text[:width - 3] + "..."


class HFConfig:
    """A config.json dict read with ``defaults`` and one-line errors that name ``source`` and the key."""

    def __init__(self, values: Mapping[str, Any], source: str, defaults: Optional[Mapping[str, Any]] = None):
        self.values, self.source, self.defaults = dict(values), source, dict(defaults or {})

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, self.defaults.get(key, default))

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} {problem}")

    def integer(self, key: str, default: Any = None, most: Optional[int] = None, what: str = "") -> int:
        """A positive integer; with ``most``, no larger (``what`` names what it counts)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"must be a positive integer, got {shown(value)}")
        if most is not None and value > most:
            raise self.fail(key, f"is {count(value)}, more than the {most:,}{what} gptlab reads")
        return value

    def layers(self, key: str, default: Any = None) -> int:
        """A layer count, at most ``gptlab.config.model.MAX_LAYERS``: checked before any per-layer map is made."""
        return self.integer(key, default, MAX_LAYERS, " layers")

    def width(self, key: str, default: Any = None) -> int:
        """A width or head count, at most ``MAX_WIDTH``: checked before any row map is made."""
        return self.integer(key, default, MAX_WIDTH)

    def number(self, key: str, default: Any = None, positive: bool = False) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value) \
                or (positive and value <= 0):
            raise self.fail(key, f"must be a finite{' positive' if positive else ''} number, got {shown(value)}")
        return float(value)

    def dropout(self, key: str, default: Any = None) -> float:
        """A dropout probability, in [0, 1)."""
        value = self.number(key, default)
        if not 0.0 <= value < 1.0:
            raise self.fail(key, f"must be a dropout probability in [0, 1), got {shown(value)}")
        return value

    def flag(self, key: str, default: Any = None) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {shown(value)}")
        return value

    def fixed(self, key: str, ok: Any, why: str) -> None:
        """Refuse a switch set to anything but the one value gptlab reproduces."""
        if key in self.values and self.values[key] != ok:
            raise self.fail(key, f"={shown_json(self.values[key])} is not supported ({why})")

    def choice(self, key: str, table: Mapping[str, Any], default: Any = None) -> Any:
        value = self.get(key, default)
        if not isinstance(value, str) or value not in table:
            raise self.fail(key, f"{shown(value)} is not supported; expected one of {', '.join(sorted(table))}")
        return table[value]

    def norm(self, name: str, eps_key: str, default_eps: float = 1e-5) -> Any:
        """A gptlab norm spec with the checkpoint's epsilon."""
        eps = self.number(eps_key, default_eps, positive=True)
        return name if eps == 1e-5 else {"name": name, "eps": eps}

    def rope_options(self, theta_keys: Iterable[str] = ("rope_theta",), fraction_keys: Iterable[str] = (),
                     default_fraction: float = 1.0) -> dict:
        """The rotary-position options (base, fraction, scaling and its factors, as the built-in rope
        plugin names them) from either layout: transformers 5's ``rope_parameters`` or the older
        top-level ``rope_theta`` / ``rope_scaling`` keys. Options at their defaults are left out.
        ``default_fraction``: the share of each head the family rotates when config.json does not
        say (GPT-NeoX: 0.25)."""
        params = self.values.get("rope_parameters") or {}
        scaling = self.values.get("rope_scaling") or params
        where = "rope_scaling" if self.values.get("rope_scaling") else "rope_parameters"
        if not isinstance(params, Mapping) or not isinstance(scaling, Mapping):
            raise self.fail(where, "must be a mapping")
        spec: dict[str, Any] = {}
        base = params.get("rope_theta", next((self.values[k] for k in theta_keys if k in self.values), 10000.0))
        if base != 10000.0:
            spec["base"] = self._positive(f"{where}.rope_theta", base)
        fraction = params.get("partial_rotary_factor",
                              next((self.values[k] for k in ("partial_rotary_factor", *fraction_keys)
                                    if k in self.values), default_fraction))
        if fraction != 1.0:
            spec["fraction"] = self._positive(f"{where}.partial_rotary_factor", fraction)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in ("linear", "llama3"):
            spec["scaling"] = kind
            spec["factor"] = self._positive(f"{where}.factor", scaling.get("factor"))
        if kind == "llama3":
            spec["low_freq_factor"] = self._positive(f"{where}.low_freq_factor", scaling.get("low_freq_factor"))
            spec["high_freq_factor"] = self._positive(f"{where}.high_freq_factor", scaling.get("high_freq_factor"))
            original = scaling.get("original_max_position_embeddings")
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                raise self.fail(f"{where}.original_max_position_embeddings",
                                f"must be a positive integer, got {shown(original)}")
            spec["original_context_length"] = original
        elif kind not in ("default", "linear"):
            raise self.fail(f"{where}.rope_type", f"{shown(kind)} is not supported (gptlab's rope scales "
                                                  f"'linear' and 'llama3'; 'dynamic', 'yarn' and 'longrope' "
                                                  f"change with the sequence or rescale attention)")
        return spec

    def _positive(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value) or value <= 0:
            raise self.fail(key, f"must be a finite positive number, got {shown(value)}")
        return float(value)


def component(cfg: Mapping[str, Any], kind: str) -> tuple[str, dict]:
    """A model config's choice of ``kind`` as (name, options), whichever form it is written in."""
    value = cfg[kind]
    if isinstance(value, str):
        return value, {}
    value = dict(value)
    return value.pop("name"), value


def rope_to_hf(options: Mapping[str, Any], family: str, partial_ok: bool = False) -> dict:
    """transformers 5's ``rope_parameters`` for gptlab rope options; refuses what ``family`` lacks."""
    out: dict[str, Any] = {"rope_theta": float(options.get("base", 10000.0)), "rope_type": "default"}
    fraction = float(options.get("fraction", 1.0))
    if partial_ok:  # always written: a family may rotate less than the whole head when it is left out
        out["partial_rotary_factor"] = fraction
    elif fraction != 1.0:
        raise ConfigError(f"rotary fraction {fraction}: {family} rotates whole heads")
    scaling = options.get("scaling")
    if scaling == "ntk":
        raise ConfigError(f"rotary scaling 'ntk': {family} checkpoints have no static NTK scaling")
    if scaling == "linear":
        out.update(rope_type="linear", factor=float(options.get("factor", 1.0)))
    if scaling == "llama3":
        out.update(rope_type="llama3", factor=float(options.get("factor", 1.0)),
                   low_freq_factor=float(options.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(options.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=options["original_context_length"])
    return out


class HFExport:
    """Checks of a gptlab model config against what one family can express (for ``to_hf``)."""

    def __init__(self, cfg: Mapping[str, Any], family: str):
        self.cfg, self.family = cfg, family

    def one_of(self, kind: str, names: Iterable[str], options: Iterable[str] = ()) -> tuple[str, dict]:
        """The ``kind`` component, refused unless its name is in ``names`` and it sets only ``options``."""
        name, opts = component(self.cfg, kind)
        names = tuple(names)
        if name not in names:
            raise ConfigError(f"{kind} '{name}': {self.family} has {' or '.join(repr(n) for n in names)}")
        extra = sorted(set(opts) - set(options))
        if extra:
            raise ConfigError(f"{kind} '{name}' option {extra[0]}: {self.family} has no equivalent")
        return name, opts

    def expect(self, key: str, value: Any, why: str) -> None:
        if self.cfg.get(key) != value:
            raise ConfigError(f"model.{key}={json.dumps(self.cfg.get(key))}: {self.family} {why}")

    def bias(self, part: str) -> bool:
        own = self.cfg.get(f"{part}_bias")
        return bool(self.cfg.get("bias", True) if own is None else own)

    def attention(self, grouped: bool) -> Optional[int]:
        """Checks the attention's options; returns its n_kv_heads (None: one per query head).
        Whether it computes what the family's does is checked when the export is read back
        (``gptlab.hf.checkpoint``: the attentions' ``computes``)."""
        name, opts = component(self.cfg, "attention")
        extra = sorted(set(opts) - ({"n_kv_heads"} if grouped else set()))
        if extra:
            raise ConfigError(f"attention '{name}' option {extra[0]}: {self.family} has no equivalent")
        return opts.get("n_kv_heads")

    def norm_eps(self, names: Iterable[str]) -> float:
        _, opts = self.one_of("norm", names, ("eps",))
        return float(opts.get("eps", 1e-5))

    def head_dim(self) -> int:
        """The head width, refused when it is not emb_dim / n_heads and the family cannot say so."""
        return self.cfg.get("head_dim") or self.cfg["emb_dim"] // self.cfg["n_heads"]

    def plain_head_dim(self) -> None:
        if self.cfg.get("head_dim") not in (None, self.cfg["emb_dim"] // self.cfg["n_heads"]):
            raise ConfigError(f"model.head_dim={self.cfg['head_dim']}: {self.family} heads are emb_dim / n_heads wide")


Export = HFExport  # its name before it was exported from gptlab (a plugin may still import it)
