"""Curves in the terminal: a one-cell unicode sparkline for tables, plotille line plots for ``show``.

rich has no chart primitive; a sparkline fits in a table cell, and plotille (pure Python,
maintained) draws braille line plots that stay readable without color thanks to per-series markers.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

BARS = "▁▂▃▄▅▆▇█"
MARKERS = "ox+*#@%&"
PLOT_WIDTH = 56  # with plotille's y-axis labels and x-axis arrow this is 79 columns


def sparkline(values: Iterable[float], width: int = 12) -> str:
    """Values as ▁..█ scaled to their own min..max, averaged into at most ``width`` cells.

    Each row is scaled on its own so the shape (fast drop, plateau, spike) is visible even when
    variants differ by less than one bar height; the numbers next to it give the levels.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return ""
    if len(vals) > width:  # mean of evenly split bins keeps the first and last segments
        bins = [vals[i * len(vals) // width:(i + 1) * len(vals) // width] for i in range(width)]
        vals = [sum(b) / len(b) for b in bins]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return BARS[0] * len(vals)
    return "".join(BARS[round((v - lo) / (hi - lo) * (len(BARS) - 1))] for v in vals)


def line_plot(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], width: int = PLOT_WIDTH,
              height: int = 14, colors: bool = False, x_label: str = "step", y_label: str = "loss") -> str:
    """Overlay (label, xs, ys) series in one plotille figure with a legend; '' when nothing to draw."""
    import plotille

    series = [(label, list(xs), list(ys)) for label, xs, ys in series if len(xs)]
    if not series:
        return ""
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys]
    fig = plotille.Figure()
    fig.width, fig.height = width, height
    fig.origin, fig.with_colors = False, colors
    fig.x_label, fig.y_label = x_label, y_label
    fig.x_ticks_fkt = lambda lo, hi: f"{lo:.0f}" if abs(lo) < 1e6 else f"{lo:.3g}"  # FLOPs: 1.2e+12
    fig.y_ticks_fkt = lambda lo, hi: f"{lo:.4g}"
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    xpad, ypad = (x1 - x0) * 0.03 or 1.0, (y1 - y0) * 0.05 or 0.05
    fig.set_x_limits(min_=x0, max_=x1 + xpad)  # the last point sits inside the canvas
    fig.set_y_limits(min_=y0 - ypad, max_=y1 + ypad)
    for i, (label, xs, ys) in enumerate(series):
        fig.plot(xs, ys, label=label, marker=MARKERS[i % len(MARKERS)])
    return fig.show(legend=True)
