"""How numbers, sizes and durations are written for people: one place, so every table agrees.

Every formatter takes None or NaN and writes ``n/a``, because a missing measurement is normal
(MFU on a CPU, a run that never evaluated) and must never crash a table.
"""
from __future__ import annotations

import json
import math
from typing import Any

NA = "n/a"


def missing(v: Any) -> bool:
    """None, NaN or an infinity: nothing to print."""
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def num(v: Any, spec: str = "{:,.1f}") -> str:
    """``spec.format(v)``, or n/a."""
    return NA if missing(v) else spec.format(v)


def si(v: Any) -> str:
    """A count with a K/M/B suffix (parameters): 124.4M."""
    if missing(v):
        return NA
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}"


def nbytes(v: Any, digits: int = 1) -> str:
    """Binary units: 1.5 GiB, 82.8 MiB, 512 B."""
    if missing(v):
        return NA
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}f} {unit}"
    return f"{v:.0f} B"


def duration(v: Any) -> str:
    """Seconds as 42.0s, 3m12s or 2h05m."""
    if missing(v):
        return NA
    if v < 60:
        return f"{v:.1f}s"
    if v < 3600:
        return f"{int(v // 60)}m{int(v % 60):02d}s"
    return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"


def yaml_value(v: Any) -> str:
    """A config value as YAML spells it (null, true, {name: rope}), so it can be pasted as an override."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)
