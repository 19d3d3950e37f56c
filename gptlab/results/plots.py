"""Loss curves as data, and as a matplotlib figure for ``gptlab show --png``.

The terminal plot and the image are drawn from the same panels (``run_panels``,
``experiment_panels``), so the two can never show different curves. matplotlib is an optional
extra: it is imported only when a figure is built, and never through pyplot, so no global
backend or window state is touched (Agg renders straight to bytes).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError, import_extra
from .. import rundir as rd
from ..rundir import COMPLETED, INTERRUPTED, RUNNING, refuse_link

#: what a curve can be drawn against: --x name -> (metrics.jsonl column, axis label)
X_AXES = {"step": ("step", "step"), "tokens": ("tokens", "tokens"), "flops": ("flops", "training FLOPs"),
          "time": ("time_s", "training time (s)")}

# (label, xs, ys) and (title, [series]): what one plot holds
Series = tuple[str, list, list]
Panel = tuple[str, list[Series]]

# matplotlib's tab10 (also plotly's D3 colourway): fixed here so the image and the HTML page agree
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
_STYLES = ("-", "--", ":", "-.")  # after ten series the colours repeat; the line style tells them apart
_MARKERS_UP_TO = 40  # points per series; beyond this markers only blur the line


# -- the curves --------------------------------------------------------------------------------
def run_panels(run_dir: Path, x: str = "step") -> list[Panel]:
    """One panel: the run's train and val loss at every logged step, against ``x`` (``X_AXES``)."""
    from .frame import read_metrics

    metrics = read_metrics(run_dir)
    panels = [("loss curves", [(name, *_xy(metrics, key, x)) for name, key in (("train", "train_loss"),
                                                                                ("val", "val_loss"))])]
    evals = eval_curves(run_dir, metrics)
    if evals:  # a run with evals: a second panel, since an accuracy does not share a loss's scale
        panels.append(("evals", [(key, *_xy(metrics, key, x)) for key in evals]))
    return panels


def eval_curves(run_dir: Path, metrics: Any) -> list:
    """The eval metrics of a run's metrics.jsonl (``hellaswag_acc``; not their ``_stderr``): the
    columns named after an eval its config.yaml lists, so a run still training has them too."""
    evals = rd.read_config(Path(run_dir)).get("evals")
    names = [e.get("name") if isinstance(e, dict) else e for e in (evals if isinstance(evals, list) else ())]
    prefixes = tuple(f"{n}_" for n in names if isinstance(n, str))
    return [c for c in metrics.columns
            if prefixes and str(c).startswith(prefixes) and not str(c).endswith("_stderr")]


def experiment_panels(df: Any, x: str = "step") -> list[Panel]:
    """Val and train loss, one mean curve per variant over its completed seeds (running or
    interrupted seeds when none completed), labelled with how many runs it averages; against ``x``,
    each step at the seeds' mean position on that axis (their tokens and FLOPs agree; times differ)."""
    from .compare import group_runs, mean_curve

    groups = group_runs(df, [])
    panels = []
    for key, title in (("val_loss", "validation loss, mean of seeds"), ("train_loss", "training loss, mean of seeds")):
        series = []
        for g in groups:
            done = [i for i in g.index if df["status"].iloc[i] == COMPLETED]
            idx = done or [i for i in g.index if df["status"].iloc[i] in (RUNNING, INTERRUPTED)]
            curve = mean_curve(df["run_dir"].iloc[idx], key)
            xs = list(curve.index)
            if x != "step":
                where = mean_curve(df["run_dir"].iloc[idx], X_AXES[x][0]).reindex(curve.index)
                keep = where.notna().to_numpy()
                xs, curve = list(where[keep]), curve[keep]
            series.append((f"{g.label} (n={len(idx)})", xs, list(curve.to_numpy())))
        panels.append((title, series))
    return panels


def run_by_run_panels(df: Any, x: str = "step") -> tuple[list[Panel], dict]:
    """Val and train loss with one line per run (``variant/sSEED``), for the image, and each
    label's variant, which sets its colour (seeds of one variant differ by line style)."""
    from .compare import group_runs
    from .frame import read_metrics

    series: dict[str, list] = {"val_loss": [], "train_loss": []}
    variant_of = {}
    for g in group_runs(df, []):
        for i in g.index:
            label = f"{g.label}/s{df['seed'].iloc[i]}"
            variant_of[label] = g.label
            metrics = read_metrics(Path(df["run_dir"].iloc[i]))
            for key in series:
                series[key].append((label, *_xy(metrics, key, x)))
    return [("validation loss", series["val_loss"]), ("training loss", series["train_loss"])], variant_of


def _xy(metrics: Any, key: str, x: str = "step") -> tuple[list, list]:
    column = X_AXES[x][0]
    if key not in metrics.columns or column not in metrics.columns:  # runs made before rows had it: no curve
        return [], []
    rows = metrics[[column, key]].dropna()
    return list(rows[column]), list(rows[key])


# -- the image ---------------------------------------------------------------------------------
def figure(title: str, panels: Sequence[Panel], x_label: str = "step", y_label: str = "loss",
           colour_of: Optional[dict] = None, log_x: Sequence[int] = (), x_labels: Optional[dict] = None) -> Any:
    """A matplotlib Figure with one axes per panel, side by side; a label keeps its colour in
    every panel. ``colour_of`` maps labels to groups that share a colour (a variant's seeds),
    told apart by line style. Names are drawn literally (no mathtext, and a leading '_' still
    gets a legend entry). Panels whose index is in ``log_x`` get a logarithmic x axis; ``x_labels``
    (index -> label) overrides ``x_label`` for a panel."""
    matplotlib = import_extra("matplotlib", "--png", "report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(label for _, series in panels for label, *_ in series))
    colour_of = colour_of or {label: label for label in labels}
    groups = list(dict.fromkeys(colour_of[label] for label in labels))
    members: dict = {}
    style = {}
    for label in labels:
        group = colour_of[label]
        i, k = groups.index(group), len(members.setdefault(group, []))
        members[group].append(label)
        # past ten groups the colours repeat and the style moves on; inside a group each member its own style
        style[label] = (PALETTE[i % len(PALETTE)], _STYLES[(i // len(PALETTE) + k) % len(_STYLES)])
    with matplotlib.rc_context({"text.parse_math": False}):
        fig = Figure(figsize=(6.4 * max(1, len(panels)), 4.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
        for i, (ax, (panel_title, series)) in enumerate(zip(axes, panels)):
            ax.set_title(panel_title)
            ax.set_xlabel((x_labels or {}).get(i, x_label))
            if i in log_x:
                ax.set_xscale("log")
            ax.set_ylabel(y_label)
            ax.grid(True, alpha=0.3)
            lines = []
            for label, xs, ys in series:
                if not len(xs):
                    continue
                color, dash = style[label]
                (line,) = ax.plot(list(xs), list(ys), color=color, linestyle=dash, linewidth=2, label=label,
                                  marker="o" if len(xs) <= _MARKERS_UP_TO else None, markersize=4)
                lines.append(line)
            if lines:
                ax.legend(lines, [line.get_label() for line in lines])
            else:
                ax.text(0.5, 0.5, "(nothing logged yet)", transform=ax.transAxes, ha="center", va="center",
                        color="gray")
        fig.suptitle(title)
    return fig


def ladder_panel(df: Any, scale: dict, metric: str = "val_loss") -> tuple[Panel, dict]:
    """A scaling ladder as one panel: each variant's mean loss per size against training FLOPs
    (markers) and its fitted E + A C^-alpha (a smooth line), a colour per variant; with the map
    from series label to variant for ``figure``'s ``colour_of``."""
    import numpy as np

    from .compare import ALIASES
    from .ladder import ladder

    runs = {h: tuple(w) for h, w in scale["runs"].items() if isinstance(w, list) and len(w) == 2}
    series, colour_of = [], {}
    for lad in ladder(df, runs, scale["baseline"], ALIASES.get(metric, metric), resamples=0):
        series.append((f"{lad.variant} (mean per size)", lad.compute, lad.loss))
        colour_of[series[-1][0]] = lad.variant
        if lad.fit is not None and lad.compute:
            xs = list(np.geomspace(min(lad.compute) / 1.5, max(lad.compute) * 1.5, 60))
            series.append((f"{lad.variant} fit: alpha {lad.fit.alpha:.3f}", xs, [lad.fit.loss(x) for x in xs]))
            colour_of[series[-1][0]] = lad.variant
    return (f"{metric} against training compute (scaling ladder)", series), colour_of


def save_png(fig: Any, path: Path) -> None:
    """Render ``fig`` to PNG bytes, then replace ``path`` in one step."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_user_file(Path(path), buf.getvalue())


def check_target(path: Path) -> Path:
    """Refuse an output path that cannot work before any work is done (a folder, a missing
    folder, a planted link)."""
    path = Path(path)
    refuse_link(path)
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory; pass a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: the folder {path.parent} does not exist")
    return path


def write_user_file(path: Path, data: bytes) -> None:
    """rundir.write_bytes_atomic to a path the user chose: a failure is one line naming the file."""
    path = check_target(path)
    try:
        rd.write_bytes_atomic(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None