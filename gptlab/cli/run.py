"""``gptlab run``: train an experiment with live progress, then print its comparison table."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, GptlabError
from ..fmt import num, yaml_value
from .progress import make_reporter

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
    r.add_argument("--force", action="store_true", help="train every run again from scratch, finished ones too")
    r.add_argument("--restart", action="store_true",
                   help="start unfinished runs over instead of resuming them from their last resumable state")
    r.add_argument("--dry-run", action="store_true", help="list the runs and how they differ; train nothing")
    r.add_argument("--jobs", default="1", metavar="N|auto",
                   help="train up to N runs at once, in worker processes: on CPU they share the cores, on CUDA "
                        "each gets its own GPU (auto: one per visible GPU; 1 on CPU). Default 1")
    r.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per run (default: the cores this process may use, divided among --jobs)")
    r.add_argument("--quiet", action="store_true", help="print only errors and the final table")
    r.set_defaults(handler=cmd_run)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from ..devices import cpu_threads, resolve_device, resolve_jobs
    from ..experiment import load_experiment
    from ..plugin_manager import build_plugin_system
    from ..runner import ExperimentRunner

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    exp = load_experiment(args.experiment, args.overrides)
    plugins = build_plugin_system(plugin_dirs=args.plugins_dir, extra=exp.plugins,
                                  base_dir=args.experiment.resolve().parent)
    device = resolve_device(args.device)
    jobs = resolve_jobs(args.jobs, device)
    threads = cpu_threads(args.threads, jobs) if device.type == "cpu" else None
    stop = _GracefulStop()
    runner = ExperimentRunner(exp, plugins, args.results_dir, device, force=args.force, restart=args.restart,
                              should_stop=lambda: stop.requested, warn=lambda m: sys.stderr.write(f"warning: {m}\n"))
    out, err = _console(), _console(stderr=True)
    for warning in exp.warnings:
        err.print(f"[yellow]warning: {escape(warning)}[/]")
    runner.prepare(write=not args.dry_run)  # a dry run makes every check the real run makes
    if args.dry_run:
        return _dry_run(runner, out, args.overrides)
    plan = runner.plan()
    kept = sum(action == "skip" for _, _, action in plan)
    resumed = sum(action == "resume" for _, _, action in plan)
    if not args.quiet:
        err.print(f"[bold]{escape(exp.name)}[/]: {len(exp.runs)} runs on {device}"
                  + (f", {threads} CPU thread(s) per run" if threads else "") + (f", {jobs} at once" if jobs > 1 else "")
                  + f"  ->  {escape(str(runner.exp_dir))}"
                  + (f"  ({kept} finished runs kept)" if kept else "")
                  + (f"  ({resumed} resumed from their last state)" if resumed else ""))
    import torch

    before = torch.get_num_threads()
    if threads and jobs == 1:
        torch.set_num_threads(threads)
    reporter = make_reporter(exp, plan, args.quiet, err)
    try:
        with stop, reporter:
            results = runner.run(on_progress=reporter.progress, on_finish=reporter.finish, jobs=jobs,
                                 threads=threads, signals=lambda: stop.count)
    finally:
        torch.set_num_threads(before)  # a caller of main() in-process keeps its own setting
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


class _GracefulStop:
    """Ctrl-C or SIGTERM (a scheduler's preemption, `kill`): the current run finishes its step, saves a
    resumable state and is marked interrupted, and the command exits 130. A second signal stops at
    once (the run resumes from its last saved state)."""

    count = 0  # stop signals received

    @property
    def requested(self) -> bool:
        return self.count > 0

    def __enter__(self) -> "_GracefulStop":
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        sys.stderr.write("\ngptlab: stopping after the current step and saving a resumable state "
                         "(signal again to stop at once)\n")


def _dry_run(runner, out, overrides: list[str]) -> int:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{runner.exp.name}: {len(runner.exp.runs)} runs (dry run, nothing trained)"),
                  caption=f"overrides for every run: {' '.join(overrides)}" if overrides else None)
    for col in ("variant", "seed", "hash", "action", "differs from base"):
        table.add_column(col)
    for spec, _, action in runner.plan():
        diff = ", ".join(f"{k}={yaml_value(v)}" for k, v in spec.changes.items()) or "-"
        table.add_row(*(Text(cell) for cell in (spec.variant, str(spec.seed), spec.config_hash, action, diff)))
    out.print(table)
    return 0


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
