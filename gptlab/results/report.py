"""One self-contained HTML page: comparison tables and every run's loss curves, interactive.

The page must open anywhere, offline and years later, so nothing is fetched: plotly.js (from the
optional ``plotly`` package) is inlined once, each plot's data is inline JSON, and the table is
plain HTML. The cells arrive already formatted (the CLI passes the columns it prints for
``gptlab compare``), so the page cannot disagree with the terminal; the numbers are also inline
as CSV, at full precision, behind a download link.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from ..errors import import_extra
from .plots import PALETTE, write_user_file
from ..rundir import COMPLETED

DASHES = ("solid", "dot", "dash", "longdash", "dashdot", "longdashdot")  # one per seed of a variant
PANELS = (("val", "validation loss", "x", "y"), ("train", "training loss", "x2", "y2"))
MARKERS_UP_TO = 60  # val points per run drawn as markers; more would only blur the line


@dataclass
class Section:
    """One comparison table as the terminal shows it, and the curves of the runs behind it.

    ``columns`` holds (header, cells, justify, styles or None) with cells as text; ``empty``
    replaces the table when no run is in it.
    """

    title: str
    description: str = ""
    columns: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    csv: str = ""
    runs: list = field(default_factory=list)
    empty: str = ""


# -- data --------------------------------------------------------------------------------------
def run_curves(df: Any) -> list[dict]:
    """Per run of ``df`` (load_results rows): a legend name, a colour per variant, a dash per seed,
    and the val and train loss it logged, with step and tokens."""
    from .compare import cell_text, group_runs
    from .frame import read_metrics

    runs = []
    for gi, g in enumerate(group_runs(df.reset_index(drop=True), [])):
        for k, i in enumerate(g.index):
            status = str(df["status"].iloc[i])
            metrics = read_metrics(df["run_dir"].iloc[i])
            runs.append({"name": f"{g.label} s{cell_text(df['seed'].iloc[i])}"
                                 + ("" if status == COMPLETED else f" ({status})"),
                         "color": PALETTE[gi % len(PALETTE)], "dash": DASHES[k % len(DASHES)],
                         "val": _points(metrics, "val_loss"), "train": _points(metrics, "train_loss")})
    return runs


#: the x axes a reader can pick: name -> (metrics.jsonl column, axis title); step is always there
X_AXES = {"step": ("step", "step"), "tokens": ("tokens", "tokens"), "flops": ("flops", "training FLOPs"),
          "time": ("time_s", "training time (s)")}


def _points(metrics: Any, key: str) -> dict:
    """Finite values of ``key`` with their position on every axis of ``X_AXES`` (None where a run
    did not log it: runs made before rows carried flops and training time)."""
    out: dict = {**{axis: [] for axis in X_AXES}, "loss": []}
    if key not in metrics.columns or "step" not in metrics.columns:
        return out
    columns = {axis: metrics[col] if col in metrics.columns else [None] * len(metrics)
               for axis, (col, _) in X_AXES.items()}
    for i, loss in enumerate(metrics[key]):
        if _finite(metrics["step"].iloc[i]) and _finite(loss):
            for axis, values in columns.items():
                v = values[i] if isinstance(values, list) else values.iloc[i]
                out[axis].append((int(v) if axis in ("step", "tokens") else float(v)) if _finite(v) else None)
            out["loss"].append(float(loss))
    return out


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def plot_spec(runs: list[dict]) -> dict:
    """Plotly traces (val left, train right; one legend entry per run toggling both), the layout,
    and the x values per trace for each axis choice (``tokens`` is None when no run logged them)."""
    data, xs = [], {axis: [] for axis in X_AXES}
    for r, run in enumerate(runs):
        shown = False
        for part, title, xaxis, yaxis in PANELS:
            c = run[part]
            if not c["loss"]:
                continue
            name = html.escape(run["name"], quote=False)  # plotly reads names as pseudo-HTML
            markers = part == "val" and len(c["loss"]) <= MARKERS_UP_TO
            data.append({"type": "scatter", "mode": "lines+markers" if markers else "lines",
                         "name": name, "legendgroup": f"run{r}", "showlegend": not shown,
                         "xaxis": xaxis, "yaxis": yaxis, "x": c["step"], "y": c["loss"],
                         "customdata": [[s, t] for s, t in zip(c["step"], c["tokens"])],
                         "line": {"color": run["color"], "dash": run["dash"], "width": 2},
                         "marker": {"size": 6},
                         "hovertemplate": "%{fullData.name}<br>step %{customdata[0]}"
                                          + ("<br>tokens %{customdata[1]:,}" if any(t is not None for t in c["tokens"])
                                             else "") + f"<br>{title} %{{y:.4f}}<extra></extra>"})
            shown = True
            for axis in X_AXES:
                xs[axis].append(c[axis])
    for axis in list(X_AXES)[1:]:  # an axis no run logged offers no choice
        if not any(t is not None for trace in xs[axis] for t in trace):
            xs[axis] = None
    layout: dict = {"height": 480, "margin": {"t": 30, "r": 10, "b": 50, "l": 60}, "hovermode": "closest",
                    "legend": {"orientation": "h", "y": -0.18}, "annotations": []}
    for k, (_, title, xaxis, yaxis) in enumerate(PANELS):
        x_key, y_key = xaxis.replace("x", "xaxis"), yaxis.replace("y", "yaxis")
        layout[x_key] = {"domain": [0.0, 0.47] if k == 0 else [0.53, 1.0], "anchor": yaxis,
                         "title": {"text": "step"}}
        layout[y_key] = {"anchor": xaxis, "title": {"text": title}}
        if not any(trace["xaxis"] == xaxis for trace in data):
            layout["annotations"].append({"text": "(nothing logged yet)", "showarrow": False, "xref": f"{xaxis} domain",
                                          "yref": f"{yaxis} domain", "x": 0.5, "y": 0.5})
    return {"data": data, "layout": layout, "x": xs}


# -- the page ----------------------------------------------------------------------------------
def page(sections: list[Section], heading: str, byline: str = "") -> str:
    """The whole HTML document, plotly.js included."""
    plotly_js = import_extra("plotly.offline", "gptlab report", "report").get_plotlyjs()
    plotly_js = plotly_js.replace("</script", "<\\/script")  # one in its strings (none today) would end the tag
    body = "\n".join(_section(s, i) for i, s in enumerate(sections))
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(heading)}</title>\n<style>{CSS}</style>\n"
            f"<script>{plotly_js}</script>\n<script>{JS}</script>\n</head>\n<body>\n"
            f"<h1>{_e(heading)}</h1>\n<p class=\"meta\">{_e(byline)}</p>\n{body}\n</body>\n</html>\n")


def subtitle(paths: list, version: str, when: Optional[str] = None) -> str:
    """The line under the heading: what the page was made from, and by which gptlab."""
    return f"{', '.join(map(str, paths))} · gptlab {version}" + (f" · {when}" if when else "")


def write_report(path: Path, text: str) -> None:
    """Replace ``path`` with the page in one step (UTF-8 whatever the locale)."""
    write_user_file(Path(path), text.encode("utf-8"))


def _section(s: Section, i: int) -> str:
    parts = [f"<section>\n<h2>{_e(s.title)}</h2>"]
    if s.description:
        parts.append(f"<p class=\"desc\">{_e(s.description)}</p>")
    if s.columns:
        parts.append(_table(s.columns))
    if s.empty:
        parts.append(f"<p class=\"note\">{_e(s.empty)}</p>")
    if s.notes:
        items = [("<li class=\"note\">" if n.startswith("note:") else "<li>") + _e(n) + "</li>" for n in s.notes]
        parts.append("<ul class=\"notes\">" + "".join(items) + "</ul>")
    if s.csv:
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s.title) or "table"
        parts.append(f"<p class=\"meta\"><a download=\"{_e(name)}.csv\" "
                     f"href=\"data:text/csv;charset=utf-8,{quote(s.csv)}\">the table as CSV</a> (full precision, "
                     f"as <code>gptlab compare --format csv</code>)</p>")
    if s.runs:
        spec = plot_spec(s.runs)
        plot_id = f"curves-{i}"
        axes = [axis for axis in X_AXES if spec["x"][axis] is not None]
        radios = " ".join(f"<label><input type=\"radio\" name=\"{plot_id}-x\" value=\"{axis}\" "
                          f"data-title=\"{_e(X_AXES[axis][1])}\"{' checked' if axis == 'step' else ''}> {axis}</label>"
                          for axis in axes)
        choice = ("" if len(axes) < 2 else
                  f"<div class=\"xsel\">x axis: {radios}"
                  f" <span class=\"meta\">click a legend entry to hide a run, double-click to show it alone</span>"
                  f"</div>")
        parts.append(f"<h3>loss curves, every run</h3>\n{choice}\n<div id=\"{plot_id}\" class=\"plot\"></div>\n"
                     f"<script>gptlabCurves({_js(plot_id)}, {_js(spec)});</script>")
    return "\n".join(parts) + "\n</section>"


def _table(columns: list) -> str:
    head = "".join(f"<th class=\"{_align(j)}\">{_e(h)}</th>" for h, _, j, _ in columns)
    nrows = len(columns[0][1])
    rows = []
    for r in range(nrows):
        cells = []
        for _, values, justify, styles in columns:
            style = (styles[r] if styles else "") or ""
            cls = " ".join([_align(justify)] + [_STYLE_CLASS[w] for w in style.split() if w in _STYLE_CLASS])
            cells.append(f"<td class=\"{cls}\">{_e(values[r])}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table class=\"cmp\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody>\n</table>")


def _align(justify: str) -> str:
    return "l" if justify == "left" else "r"


def _e(text: Any) -> str:
    return html.escape(str(text))


def _js(obj: Any) -> str:
    """JSON that is safe inside <script>: no '</script>' or '<!--' can be formed, non-ASCII escaped."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_STYLE_CLASS = {"red": "bad", "yellow": "warn", "bold": "sig"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #777; font-size: 0.9em; }
table.cmp { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 0.92em; }
table.cmp th, table.cmp td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; white-space: nowrap; }
table.cmp th { border-bottom: 2px solid #ccc; }
table.cmp tbody tr:hover { background: #f5f8ff; }
.l { text-align: left; } .r { text-align: right; }
.bad { color: #c0392b; } .warn { color: #a66d00; } .sig { font-weight: bold; }
ul.notes { color: #666; font-size: 0.88em; padding-left: 1.2em; } .note { color: #a66d00; }
.xsel { margin: 0.5em 0; } .plot { width: 100%; }
"""

# Builds a section's plot; the radio buttons swap every trace's x between step, tokens, FLOPs and time. plotly.js
# 4 shows a "Share chart" button that uploads the data to plotly's cloud: it and every link are off.
JS = """
var gptlabConfig = {responsive: true, displaylogo: false, showSendToCloud: false, showLink: false,
                    showEditInChartStudio: false, plotlyServerURL: ""};
function gptlabCurves(id, spec) {
  var el = document.getElementById(id);
  Plotly.newPlot(el, spec.data, spec.layout, gptlabConfig);
  document.querySelectorAll('input[name="' + id + '-x"]').forEach(function (input) {
    input.addEventListener("change", function () {
      var key = input.value, title = input.getAttribute("data-title") || key;
      Plotly.update(el, {x: spec.x[key]}, {"xaxis.title.text": title, "xaxis2.title.text": title});
    });
  });
}
"""
