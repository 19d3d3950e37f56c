"""``gptlab compare`` and ``gptlab show``: tables and curves read from run directories.

They only read results (``show --png`` writes the one image it is asked for), and import neither
torch nor anything that does; matplotlib loads only for --png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from .. import fmt
from ..errors import ConfigError
from ..rundir import (COMPLETED, DIVERGED, EXPERIMENT, FAILED, INTERRUPTED, RUNNING, SUMMARY, damage, is_run_dir,
                      length_multiple, read_experiment, read_summary, summary_oddities)

COMPARE_HELP = """\
PATH: experiment directories (results/<name>), run directories, or a folder of experiments;
each experiment gets its own table against its own baseline (--merge: one table). Options left
out come from the experiment's compare block. Only seeds are ever pooled into one row.
--metric: val_loss (final), best_val_loss, train_loss, val_loss@2x, or any metric a plugin logged.
--sort: a column of --format csv (e.g. tokens_per_s, delta); prefix - for descending.
"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("compare", parents=[common], help="one row per variant: mean ± std over seeds, Δ to a baseline with a 95%% CI",
                       epilog=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="experiment or run directories (default: every experiment under --results-dir)")
    c.add_argument("--results-dir", type=Path, default=Path("results"), help="default: results")
    c.add_argument("--by", metavar="KEY[,KEY]", help="group by config keys (default: the variant)")
    c.add_argument("--baseline", metavar="NAME", help="row the others are compared with")
    c.add_argument("--metric", metavar="NAME", help="primary metric (default: val_loss)")
    c.add_argument("--at-step", type=int, metavar="N", help="use the metric's value logged at step N")
    c.add_argument("--at", metavar="AXIS=BUDGET",
                   help="read each run's validation curve at equal compute: flops=3e13, tokens=2e6 or time=60 "
                        "(seconds of training); linear between evaluations, never extrapolated")
    c.add_argument("--seeds-needed", action="store_true",
                   help="a column with the seeds per arm that would resolve each row's difference to the baseline "
                        "(95%% confidence, 80%% power, from the observed seed spread)")
    c.add_argument("--sort", metavar="COLUMN", help="sort rows by this column (default: declaration order)")
    c.add_argument("--format", default="table", metavar="FORMAT", help="table (default), csv, md or json")
    c.add_argument("--merge", action="store_true",
                   help="one table for every experiment given (default: one table per experiment, each against "
                        "its own baseline); keys that differ between their runs become columns")
    c.add_argument("--all", action="store_true",
                   help="also runs made with command-line overrides or by an earlier version of the experiment "
                        "file (marked in a 'made with' column)")
    c.set_defaults(handler=cmd_compare)

    s = sub.add_parser("show", parents=[common], help="a run's config, summary and loss curves; or an experiment's curves overlaid")
    s.add_argument("path", type=Path, help="run directory or experiment directory")
    s.add_argument("--x", choices=("step", "tokens", "flops", "time"), default="step",
                   help="what the curves are drawn against: step (default), tokens, training FLOPs or training "
                        "time in seconds (evaluation and checkpoints excluded)")
    s.add_argument("--png", type=Path, metavar="FILE",
                   help="write the same curves as a PNG image instead of printing (needs the report extra: "
                        "pip install -e \".[report]\")")
    s.set_defaults(handler=cmd_show)


# -- compare -----------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from .table import print_compare

    from ..results.compare import parse_budget

    at = parse_budget(args.at) if args.at else None
    print_compare([experiment_folder(p, args.results_dir) for p in args.paths], by=args.by, baseline=args.baseline, metric=args.metric, at_step=args.at_step, at=at,
                  seeds_needed=args.seeds_needed,
                  sort=args.sort, format=args.format, results_dir=args.results_dir, merge=args.merge,
                  all_runs=args.all)
    return 0


def experiment_folder(path: Path, results_dir: Path) -> Path:
    """An experiment's YAML file stands for its results folder (``--results-dir``/<its name>)."""
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return path
    from ..files import load_yaml

    name = load_yaml(path, dict).get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: no 'name' key, so no results folder to read; pass results/<name>")
    return Path(results_dir) / name


# -- show --------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    path = Path(args.path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run directory or an experiment directory (results/<name>)")
    console = Console(highlight=False)
    png = getattr(args, "png", None)
    if png:
        from ..results.plots import check_target

        check_target(png)  # a folder or a missing folder fails before anything is read
    if path.is_dir() and is_run_dir(path):
        reason = damage(path)
        if reason:
            raise ConfigError(f"{path}: cannot show it: {reason}")
        odd = summary_oddities(read_summary(path) or {})
        if odd:  # shown as n/a: say why
            sys.stderr.write(f"gptlab: warning: run {path}: {SUMMARY} holds {'; '.join(odd)} (shown as n/a)\n")
        if png:
            png_run(path, png, console, args.x)
        else:
            show_run(path, console, args.x)
    elif path.is_dir() and ((path / EXPERIMENT).is_file() or any(
            is_run_dir(p) for p in path.iterdir() if p.is_dir())):
        if png:
            png_experiment(path, png, console, args.x)
        else:
            show_experiment(path, console, args.x)
    else:
        raise ConfigError(f"{path} is neither a run directory (config.yaml, summary.json) nor an experiment "
                          f"directory holding runs")
    return 0


def show_run(run_dir: Path, console: Any, x: str = "step") -> None:
    """Header, config (keys differing from the experiment base marked), summary, loss curves."""
    from rich.columns import Columns
    from rich.table import Table
    from rich.text import Text

    from ..results.plots import run_panels
    from ..results.frame import read_run, table_config

    row, config = read_run(run_dir)
    status = row["status"]
    console.print(Text.assemble((f"{row['experiment']} / {row['variant']} / seed {row['seed']}", "bold"), "  ",
                                (status, _STATUS_STYLE.get(status, "")), "  ", (str(run_dir), "dim")))
    base = table_config(read_experiment(run_dir.parent, warn=True).get("base") or {})
    differs = {k for k, v in config.items() if base and base.get(k, _MISSING) != v}
    head = "config" + ("  (* = differs from the experiment base)" if base else
                       "  (no experiment.json next to the run: nothing to compare against)")
    console.print(Text("\n" + head, style="bold"))
    if differs:
        changed = ", ".join(f"{k}={fmt.yaml_value(config[k])}" for k in config if k in differs)
        console.print(Text("differs from base: " + changed, style="bold yellow"))
    console.print(Columns([Text(("* " if k in differs else "") + f"{k}={fmt.yaml_value(v)}",
                                style="bold yellow" if k in differs else "") for k, v in config.items()],
                          padding=(0, 2)))

    console.print(Text("\nsummary", style="bold"))
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    pairs = _summary_pairs(row)
    for i in range(0, len(pairs), 2):
        cells = [x for pair in pairs[i:i + 2] for x in pair]
        grid.add_row(*[Text(str(c), style="dim" if j % 2 == 0 else "") for j, c in enumerate(cells)])
    console.print(grid)
    for key in sorted(k for k in row if length_multiple(k) is not None):
        value = row[key]
        note = row.get(f"notes.{key}")
        console.print(Text(f"{key}: " + _num(value) + (f" ({note})" if note and value is None else "")))
    if row.get("error"):
        console.print(Text(f"error: {row['error']}", style="red"))

    for title, series in run_panels(run_dir, x):
        _print_plot(console, title, series, x)


def show_experiment(exp_dir: Path, console: Any, x: str = "step") -> None:
    """Each variant's mean curve (over its completed seeds) overlaid, for val loss and train loss."""
    from rich.text import Text

    from ..results.plots import experiment_panels
    from ..run.experiment import current_definition
    from ..results.frame import load_results

    df = load_results(exp_dir, defined_by=current_definition)
    meta = read_experiment(exp_dir)
    counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    console.print(Text.assemble((str(meta.get("name") or exp_dir.name), "bold"), f"  {len(df)} runs ({counts})  ",
                                (str(exp_dir), "dim")))
    if meta.get("description"):
        console.print(Text(str(meta["description"])))
    for title, series in experiment_panels(df, x):
        _print_plot(console, title, series, x)
    console.print(Text(f"table: gptlab compare {exp_dir}", style="dim"))


def png_run(run_dir: Path, png: Path, console: Any, x: str = "step") -> None:
    """The run's loss curves as an image, titled with what show_run prints first."""
    from ..results.plots import run_panels
    from ..results.frame import read_run

    row, _ = read_run(run_dir)
    _write_png(console, png, f"{row['experiment']} / {row['variant']} / seed {row['seed']}  ({row['status']})",
               run_panels(run_dir, x), x=x)


def png_experiment(exp_dir: Path, png: Path, console: Any, x: str = "step") -> None:
    """Every run's curves as an image: one line per variant/seed, a colour per variant."""
    from ..results.plots import run_by_run_panels
    from ..run.experiment import current_definition
    from ..results.frame import load_results

    df = load_results(exp_dir, defined_by=current_definition)
    meta = read_experiment(exp_dir)
    name = str(meta.get("name") or exp_dir.name)
    panels, variant_of = run_by_run_panels(df, x)
    scale = meta.get("scale")
    if isinstance(scale, dict) and isinstance(scale.get("runs"), dict) and isinstance(scale.get("baseline"), str):
        from ..results.plots import ladder_panel  # a ladder: loss against compute with the fits, first

        panel, colours = ladder_panel(df, scale, (meta.get("compare") or {}).get("metric") or "val_loss")
        panels, variant_of = [panel, *panels], {**colours, **variant_of}
        _write_png(console, png, f"{name}  ({len(df)} runs)", panels, variant_of, x, log_x=(0,),
                   x_labels={0: "training FLOPs"})
        return
    _write_png(console, png, f"{name}  ({len(df)} runs)", panels, variant_of, x)


def _write_png(console: Any, png: Path, title: str, panels: list, colour_of: Optional[dict] = None,
               x: str = "step", log_x: tuple = (), x_labels: Optional[dict] = None) -> None:
    from ..results.plots import X_AXES, figure, save_png

    fig = figure(title, panels, x_label=X_AXES[x][1], colour_of=colour_of, log_x=log_x, x_labels=x_labels)
    save_png(fig, png)
    drawn = sum(1 for _, series in panels for _, xs, _ in series if len(xs))
    print(f"wrote {png} ({drawn} curves)")  # one line, never wrapped: scripts read it


def _print_plot(console: Any, title: str, series: list, x: str = "step") -> None:
    from rich.text import Text

    from ..results.plots import X_AXES
    from ..results.termplot import line_plot

    console.print(Text("\n" + title, style="bold"))
    plot = line_plot(series, colors=bool(console.is_terminal and console.color_system), x_label=X_AXES[x][1])
    console.print(Text.from_ansi(plot) if plot else Text("(nothing logged yet)", style="dim"), crop=False)


def _num(v: Any, spec: str = "{:.4f}") -> str:
    """fmt.num for a summary value, which may hold text where a number belongs (a hand-edited file)."""
    return fmt.num(v if isinstance(v, (int, float)) else None, spec)


def _summary_pairs(row: dict) -> list[tuple[str, str]]:
    def num(key: str, spec: str = "{:.4f}") -> str:
        return _num(row.get(key), spec)

    best = num("best_val_loss") + (f" @{num('best_val_step', '{:,}')}" if row.get("best_val_step") is not None else "")
    memory = num("peak_memory", "{:,.0f} B")
    if memory == fmt.NA and num("memory_estimate") != fmt.NA:
        memory = f"~{row['memory_estimate']:,.0f} B (estimate)"
    diverged = num("diverged_step", "{:,}") if row.get("diverged_step") else fmt.NA
    pairs = [("status", str(row["status"]) + (f" at step {diverged}" if diverged != fmt.NA else "")),
             ("step", num("step", "{:,}")), ("final val", num("final_val_loss")), ("best val", best),
             ("final train", num("final_train_loss")), ("tokens", num("tokens", "{:,}")),
             ("tok/s", num("tokens_per_s", "{:,.0f}")), ("MFU", num("mfu", "{:.1%}")),
             ("params", num("parameters", "{:,}")), ("memory", memory),
             ("wall", num("wall_time_s", "{:.1f} s")), ("device", str(row.get("device") or fmt.NA))]
    for key in sorted(k for k in row if k.startswith("aux_losses.")):  # the objective's other terms, last logged
        pairs.append((f"aux {key.split('.', 1)[1]}", num(key, "{:.4g}")))
    for key in _eval_metrics(row):  # downstream evals, as the last step measured them
        pairs.append((key, num(key)))
    return pairs


def _eval_metrics(row: dict) -> list:
    """The eval metrics a run's summary names (``eval_metrics``, JSON text in a table row)."""
    import json

    names = row.get("eval_metrics")
    try:
        names = json.loads(names) if isinstance(names, str) else names
    except ValueError:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


_MISSING = object()
_STATUS_STYLE = {COMPLETED: "green", DIVERGED: "red", FAILED: "red", INTERRUPTED: "yellow", RUNNING: "cyan"}
