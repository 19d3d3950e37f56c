"""``gptlab run``: train an experiment with live progress, then print its comparison table."""
from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path
from typing import Any

from ..errors import GptlabError
from ..fmt import num, yaml_value

EXPERIMENT_FORMAT = """\
experiment format (YAML; every key is checked, a typo is an error with a suggestion):
  name: preln_vs_postln          # folder under the results directory
  description: ...
  plugins: [my_plugins.py]       # extra plugin files (relative to the YAML) or module names
  model: {preset: micro, norm_placement: pre, position: {name: rope, base: 10000}}
  data:  {dataset: python_docs, tokenizer: bytes, val_fraction: 0.1}
  train: {steps: 300, batch_size: 16, lr: 3e-3, warmup_steps: 0, grad_clip: null, eval_every: 50}
  variants:                      # named partial configs, merged over the base
    pre_ln:  {model: {norm_placement: pre}}
    post_ln: {model: {norm_placement: post}}
  grid: {model.activation: [gelu, swiglu]}   # optional cross product with every variant
  seeds: [0, 1, 2]
  compare: {baseline: pre_ln, metric: val_loss}
overrides: key=value pairs (OmegaConf dotlist) apply to every run, e.g. train.steps=50 seeds=[0].
"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("run", parents=[common], help="train every variant of an experiment",
                       epilog=EXPERIMENT_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("experiment", type=Path, help="experiment YAML file")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    r.add_argument("--results-dir", type=Path, default=Path("results"), help="where runs are stored (default: results)")
    r.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    r.add_argument("--plugins-dir", type=Path, action="append", default=[], help="extra plugin folder (repeatable)")
    r.add_argument("--force", action="store_true", help="rerun runs that already finished")
    r.add_argument("--dry-run", action="store_true", help="list the runs and how they differ; train nothing")
    r.set_defaults(handler=cmd_run)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..experiment import load_experiment
    from ..plugin_manager import build_plugin_system
    from rich.markup import escape

    from ..runner import ExperimentRunner

    exp = load_experiment(args.experiment, args.overrides)
    plugins = build_plugin_system(plugin_dirs=args.plugins_dir, extra=exp.plugins,
                                  base_dir=args.experiment.resolve().parent)
    device = resolve_device(args.device)
    runner = ExperimentRunner(exp, plugins, args.results_dir, device, force=args.force)
    out, err = _console(), _console(stderr=True)
    for warning in exp.warnings:
        err.print(f"[yellow]warning: {escape(warning)}[/]")
    runner.prepare(write=not args.dry_run)  # a dry run makes every check the real run makes
    if args.dry_run:
        return _dry_run(runner, out, args.overrides)
    kept = sum(action == "skip" for _, _, action in runner.plan())
    err.print(f"[bold]{exp.name}[/]: {len(exp.runs)} runs on {device}  ->  {runner.exp_dir}"
              + (f"  ({kept} finished runs kept, {len(exp.runs) - kept} to train)" if kept else ""))
    with _sigterm_interrupts():
        results = _run_with_progress(runner, err)
    _print_compare(results, exp, out, err)
    busy = [r for r in results if r.get("_action") == "busy"]
    if busy:
        err.print(f"[yellow]{len(busy)} run(s) were being trained by another gptlab process and were left to it[/]")
    failed = [r for r in results if r.get("status") == "failed"]
    if failed:
        err.print(f"[red]{len(failed)} run(s) failed[/]; see error.txt in: "
                  + ", ".join(Path(r["_dir"]).name for r in failed))
        return 1
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """Treat SIGTERM (a scheduler's preemption, `kill`) like Ctrl-C: the current run is marked interrupted."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dry_run(runner, out, overrides: list[str]) -> int:
    from rich.table import Table

    table = Table(title=f"{runner.exp.name}: {len(runner.exp.runs)} runs (dry run, nothing trained)",
                  caption=f"overrides for every run: {' '.join(overrides)}" if overrides else None)
    for col in ("variant", "seed", "hash", "action", "differs from base"):
        table.add_column(col)
    for spec, _, action in runner.plan():
        diff = ", ".join(f"{k}={yaml_value(v)}" for k, v in spec.changes.items()) or "-"
        table.add_row(spec.variant, str(spec.seed), spec.config_hash, action, diff)
    out.print(table)
    return 0


def _run_with_progress(runner, err) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn())
    tasks: dict[str, Any] = {}
    with Progress(*columns, console=err, transient=False) as progress:
        def on_progress(spec, state, row):
            key = spec.dir_name
            if key not in tasks:
                tasks[key] = progress.add_task(f"{spec.variant} s{spec.seed}", total=spec.train.steps,
                                               loss="-", tps="-")
            tps = row.get("tokens_per_s")
            progress.update(tasks[key], completed=state.step, loss=f"{row['train_loss']:.3f}",
                            tps=f"{tps:,.0f}" if tps else "-")
        return runner.run(on_progress=on_progress)


def _print_compare(results: list[dict], exp, out, err) -> None:
    """End a run with the comparison table of this invocation's runs (the experiment's compare block)."""
    from .table import print_compare

    try:
        print_compare([r["_dir"] for r in results], **exp.compare)
    except GptlabError as exc:  # a bad compare block must not hide finished training
        err.print(f"[yellow]comparison table skipped: {exc}[/]")
        _print_run_table(results, out)


def _print_run_table(results: list[dict], out) -> None:
    from rich.table import Table

    table = Table(title="runs")
    for col in ("variant", "seed", "status", "final val", "best val", "tok/s", "params", "wall s", ""):
        table.add_column(col, justify="right" if col not in ("variant", "status", "") else "left")
    for r in results:
        def f(key, spec="{:.4f}"):
            v = r.get(key)
            return num(v if isinstance(v, (int, float)) else None, spec)
        table.add_row(r.get("variant", "?"), str(r.get("seed")), r.get("status", "?"), f("final_val_loss"),
                      f("best_val_loss"), f("tokens_per_s", "{:,.0f}"), f("parameters", "{:,}"),
                      f("wall_time_s", "{:.1f}"), "(kept)" if r.get("_action") == "skip" else "")
    out.print(table)
