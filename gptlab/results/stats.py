"""The interval behind every Δ in ``gptlab compare``.

Seeds are few and two architectures need not share a variance, so the difference of means gets
Welch's t interval (Welch–Satterthwaite degrees of freedom) rather than a pooled-variance one.
scipy's t quantile is imported on first use, from scipy.special (scipy.stats alone takes longer
to import than the rest of ``gptlab compare``).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def welch_ci(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch t interval; NaN bounds when a side has fewer than 2 values."""
    from scipy.special import stdtrit  # the t distribution's quantile: stdtrit(dof, p) == stats.t.ppf(p, dof)

    a, b = np.asarray(list(a), float), np.asarray(list(b), float)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return delta, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:  # every seed identical on both sides: nothing to be uncertain about
        return delta, delta, delta
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stdtrit(dof, 0.5 + level / 2) * math.sqrt(va + vb))
    return delta, delta - half, delta + half
