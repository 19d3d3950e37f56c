"""A scaling ladder read back: loss against training compute per variant, fitted as a power law
with an irreducible term, and each variant's compute multiplier against the baseline.

The fit is L(C) = E + A C^-alpha. For a fixed E the rest is a straight line in log-log space, so
E is searched on a grid below the smallest loss (then refined) and A, alpha come from least squares:
no optimiser to start or tune. A variant's compute multiplier at a loss L is C_base(L) / C_variant,
where C_base(L) = (A / (L - E))^(1/alpha) inverts the baseline's fit: how much more (> 1) or less
(< 1) compute the baseline needs to reach the loss the variant reaches. Intervals come from a
bootstrap over seeds: each (variant, size) cell's runs are resampled with replacement and
everything is refitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..rundir import METRIC_ALIASES, read_experiment

#: bootstrap resamples, and the generator seed that makes every table reproducible
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A C^-alpha, fitted to (compute, loss) points."""

    E: float
    A: float
    alpha: float

    def loss(self, compute: float) -> float:
        return self.E + self.A * compute ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """The compute at which this law reaches ``loss`` (inf at or below its floor E)."""
        if not loss > self.E or self.alpha <= 0:
            return math.inf
        return (self.A / (loss - self.E)) ** (1.0 / self.alpha)


def fit_power_law(compute, loss, grid: int = 400) -> PowerLaw:
    """The least-squares fit (in loss) of E + A C^-alpha to the points, E in [0, min loss)."""
    c, y = np.asarray(compute, float), np.asarray(loss, float)
    if len(c) < 3 or len(set(np.round(np.log(c), 12))) < 2:
        raise ValueError("a power-law fit needs points at 3 or more runs and 2 or more computes")
    x = np.log(c)
    top = float(y.min())

    def best(Es: np.ndarray) -> tuple[float, float, float, float]:
        z = np.log(y[None, :] - Es[:, None])  # every E is below the smallest loss
        xm, zm = x.mean(), z.mean(axis=1, keepdims=True)
        slope = ((x - xm) * (z - zm)).sum(axis=1) / ((x - xm) ** 2).sum()
        icpt = zm[:, 0] - slope * xm
        pred = Es[:, None] + np.exp(icpt[:, None] + slope[:, None] * x[None, :])
        sse = ((pred - y[None, :]) ** 2).sum(axis=1)
        i = int(np.nanargmin(sse))
        return float(Es[i]), float(np.exp(icpt[i])), float(-slope[i]), float(sse[i])

    span = top * (1 - 1e-9)
    E, A, alpha, _ = best(np.linspace(0.0, span, grid))
    step = span / (grid - 1)
    for _ in range(3):  # refine around the best grid point
        lo, hi = max(0.0, E - step), min(span, E + step)
        E, A, alpha, _ = best(np.linspace(lo, hi, 41))
        step = (hi - lo) / 40
    return PowerLaw(E, A, alpha)


@dataclass(frozen=True)
class VariantLadder:
    """One variant's ladder: the fit, per size its mean compute and loss, and the multipliers."""

    variant: str
    fit: Optional[PowerLaw]
    sizes: list  # size names with completed runs, smallest compute first
    compute: list  # mean training FLOPs per size
    loss: list  # mean loss per size
    n: list  # completed runs per size
    multiplier: list  # per size: C_base(loss) / compute
    multiplier_ci: list  # per size: (low, high) 95% bootstrap
    fitted: float  # from the fits, at the variant's largest compute
    fitted_ci: tuple
    alpha_ci: tuple


def ladder(df: pd.DataFrame, runs: dict, baseline: str, metric: str = "final_val_loss",
           resamples: int = BOOTSTRAP) -> list[VariantLadder]:
    """Each variant's ladder from ``df`` (load_results rows); ``runs`` maps a config hash to
    (variant, size). Only completed runs with a finite metric and FLOP count are used."""
    cells: dict = {}
    for _, row in df.iterrows():
        where = runs.get(row["config_hash"])
        value = pd.to_numeric(row.get(metric), errors="coerce")
        flops = pd.to_numeric(row.get("flops_per_token"), errors="coerce") * \
            pd.to_numeric(row.get("tokens"), errors="coerce")
        if where is None or row["status"] != "completed" or not (np.isfinite(value) and np.isfinite(flops)):
            continue
        cells.setdefault(tuple(where), []).append((float(flops), float(value)))
    variants = list(dict.fromkeys(v for v, _ in cells))
    if baseline not in variants:
        return []
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    observed = _fits(cells, variants)
    if all(len(pts) == 1 for pts in cells.values()):
        resamples = 0  # one seed per cell: resampling changes nothing, so no interval is given
    samples = [{k: [pts[i] for i in rng.integers(0, len(pts), len(pts))] for k, pts in cells.items()}
               for _ in range(resamples)]
    draws = [_fits(sample, variants) for sample in samples]
    out = []
    for v in variants:
        sizes = sorted((s for (vv, s) in cells if vv == v), key=lambda s: np.mean([c for c, _ in cells[(v, s)]]))
        comp = [float(np.mean([c for c, _ in cells[(v, s)]])) for s in sizes]
        loss = [float(np.mean([l for _, l in cells[(v, s)]])) for s in sizes]
        fit, base = observed.get(v), observed.get(baseline)
        mult = [_multiplier(base, l, c) for l, c in zip(loss, comp)]
        per_size = [[_multiplier(d.get(baseline), *_cell_mean(sample, v, s)) for d, sample in zip(draws, samples)]
                    for s in sizes]
        top = max(comp) if comp else math.nan
        fitted = _multiplier(base, fit.loss(top), top) if fit and base else math.nan
        boot = [_multiplier(d.get(baseline), d[v].loss(top), top) if d.get(v) and d.get(baseline) else math.nan
                for d in draws]
        alphas = [d[v].alpha for d in draws if d.get(v)]
        out.append(VariantLadder(v, fit, sizes, comp, loss, [len(cells[(v, s)]) for s in sizes], mult,
                                 [_interval(m) for m in per_size], fitted, _interval(boot), _interval(alphas)))
    return out


def _fits(cells: dict, variants: list) -> dict:
    """Variant -> PowerLaw fitted to all its points (None where fewer than 3 sizes have runs)."""
    out: dict = {}
    for v in variants:
        points = [p for (vv, _), pts in cells.items() if vv == v for p in pts]
        sizes = {s for (vv, s) in cells if vv == v}
        try:
            out[v] = fit_power_law([c for c, _ in points], [l for _, l in points]) if len(sizes) >= 3 else None
        except ValueError:
            out[v] = None
    return out


def _cell_mean(cells: dict, variant: str, size: str) -> tuple[float, float]:
    """(mean loss, mean compute) of one (variant, size) cell."""
    pts = cells[(variant, size)]
    return float(np.mean([l for _, l in pts])), float(np.mean([c for c, _ in pts]))


def _multiplier(base: Optional[PowerLaw], loss: float, compute: float) -> float:
    if base is None or not np.isfinite(loss) or not compute > 0:
        return math.nan
    return base.compute_for(loss) / compute


def _interval(values: list) -> tuple:
    vals = np.asarray([v for v in values if isinstance(v, float) and math.isfinite(v)] if values else [], float)
    if not len(values) or len(vals) < max(10, len(values) // 2):  # too many resamples without an answer: no interval
        return (math.nan, math.nan)
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def describe(ladders: list[VariantLadder], baseline: str, metric: str) -> list[str]:
    """The lines a table prints under a ladder: each variant's fit and compute multipliers."""
    lines = [f"scaling ladder: {metric} against training FLOPs, fitted as E + A C^-alpha per variant; compute "
             f"multiplier = the compute {baseline} needs to reach a variant's loss / the variant's compute "
             f"(> 1: the variant is more efficient); [95% bootstrap interval over seeds]"]
    for lad in ladders:
        fit = lad.fit
        law = (f"E {fit.E:.3f}, A {fit.A:.3g}, alpha {fit.alpha:.3f} {_ci(lad.alpha_ci, '{:.3f}')}" if fit
               else "no fit (needs completed runs at 3 sizes)")
        if lad.variant == baseline:
            lines.append(f"  {lad.variant} (baseline): {law}")
            continue
        sizes = ", ".join(f"{s} {_x(m)} {_ci(ci)}" for s, m, ci in zip(lad.sizes, lad.multiplier, lad.multiplier_ci))
        lines.append(f"  {lad.variant}: {law}; multiplier at each size: {sizes}; from the fits at "
                     f"{lad.compute[-1] if lad.compute else math.nan:.3g} FLOPs: {_x(lad.fitted)} {_ci(lad.fitted_ci)}")
    return lines


def _x(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}x"


def _ci(ci: tuple, spec: str = "{:.2f}x") -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[no interval: needs 2+ seeds per size]"
    return f"[{spec.format(lo)}, {spec.format(hi)}]"


# -- the ladder in an experiment's tables ------------------------------------------------------
def scale_record(df: pd.DataFrame) -> Optional[dict]:
    """What experiment.json says of the experiment's ``scale:`` ladder, when it has one."""
    dirs = list(dict.fromkeys(str(Path(d).parent) for d in df["run_dir"]))
    record = read_experiment(Path(dirs[0])).get("scale") if len(dirs) == 1 else None
    ok = isinstance(record, dict) and isinstance(record.get("runs"), dict) and isinstance(record.get("baseline"), str)
    return record if ok else None


def ladder_parts(df: pd.DataFrame, scale: Optional[dict], baseline: Optional[str]) -> list[tuple]:
    """(size, its runs, its baseline label) per ladder size, smallest first; one part without a ladder."""
    if scale is None:
        return [(None, df, baseline)]
    where = [scale["runs"].get(h) for h in df["config_hash"]]
    size_of = [w[1] if isinstance(w, list) and len(w) == 2 else None for w in where]
    order = [s.get("name") for s in scale.get("sizes") or [] if isinstance(s, dict)]
    sizes = sorted({s for s in size_of if s is not None}, key=lambda s: order.index(s) if s in order else len(order))
    parts = []
    for size in sizes:
        rows = df[[s == size for s in size_of]]
        label = f"{baseline or scale['baseline']},size={size}"
        parts.append((size, rows, label if label in set(rows["variant"]) else baseline))
    rest = df[[s is None for s in size_of]]
    if len(rest):
        parts.append(("not in the ladder", rest, baseline))
    return parts


def ladder_lines(df: pd.DataFrame, scale: dict, metric: str, baseline: Optional[str] = None) -> list[str]:
    """The ladder's fit and multipliers in words (``gptlab.results.ladder``), for the last table."""
    column = METRIC_ALIASES.get(metric, metric)
    runs = {h: tuple(w) for h, w in scale["runs"].items() if isinstance(w, list) and len(w) == 2}
    base = baseline if baseline in {v for v, _ in runs.values()} else scale["baseline"]
    return describe(ladder(df, runs, base, column), base, metric)
