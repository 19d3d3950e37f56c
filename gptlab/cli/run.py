"""``gptlab run``: train an experiment with live progress, then print its comparison table."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, GptlabError
from ..fmt import num, yaml_value
from ..config.run import SLURM_FLAGS
from ..run.tracking import parse_track
from .progress import make_reporter

LAUNCHERS = ("inprocess", "local", "slurm")

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
  slurm: {partition: gpu, gpus_per_run: 1, time: 60, mem: 32, array_parallelism: 8}   # --launcher slurm
  track: [tensorboard, mlflow]   # tracking sinks (pip install -e ".[tensorboard]" etc.); --track adds more
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
    r.add_argument("--allow-large", action="store_true",
                   help="train models whose fp32 training state (16 bytes a parameter), buffers and batch need "
                        "more memory than this machine (or its largest GPU) has; refused otherwise")
    r.add_argument("--jobs", default=None, metavar="N|auto",
                   help="train up to N runs at once, in worker processes: on CPU they share the cores, on CUDA "
                        "each gets its own GPU (auto: one per visible GPU; 1 on CPU). Default 1")
    r.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per run (default: the cores this process may use, divided among --jobs)")
    r.add_argument("--quiet", action="store_true", help="print only errors and the final table")
    r.add_argument("--track", action="append", default=[], metavar="NAME[,NAME]",
                   help="also report every run to these trackers: tensorboard, wandb, mlflow or a plugin's "
                        "(repeatable or comma-separated; added to the experiment's track: list, which "
                        "track=[...] replaces)")
    c = r.add_argument_group("launchers", "train each pending run as a task of one job array, through submitit\n"
                                          "(pip install -e \".[slurm]\"); these flags override the experiment file's\n"
                                          "slurm: section")
    c.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                   help="inprocess: train here (default); slurm: a Slurm job array; local: the same tasks as "
                        "subprocesses on this machine (submitit's local executor)")
    c.add_argument("--partition", metavar="NAME", help="Slurm partition")
    c.add_argument("--gpus-per-run", type=int, metavar="N", help="GPUs per run (per task)")
    c.add_argument("--time", type=int, metavar="MINUTES", help="time limit per run; required by --launcher slurm")
    c.add_argument("--mem", type=float, metavar="GB", help="memory per run")
    c.add_argument("--array-parallelism", type=int, metavar="N", help="runs of the array Slurm starts at once")
    c.add_argument("--no-wait", action="store_true",
                   help="return once the runs are submitted; follow them with gptlab status RESULTS_DIR/EXPERIMENT")
    r.set_defaults(handler=cmd_run)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from ..train.devices import cpu_threads, resolve_device, resolve_jobs
    from ..run.experiment import load_experiment
    from ..plugin.manager import build_plugin_system
    from ..run.runner import ExperimentRunner
    from ..run.workers import run_parallel

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    _check_launcher_flags(args)
    built: list = []

    def plugin_system(extra: list):
        """The one plugin system of this command (--plugins-dir and the experiment's plugins: list),
        built when the loader first needs an importer (model: {from_hf: DIR}) or after it."""
        if not built:
            built.append(build_plugin_system(plugin_dirs=args.plugins_dir, extra=extra,
                                             base_dir=args.experiment.resolve().parent))
        return built[0]

    exp = load_experiment(args.experiment, args.overrides, plugins=plugin_system)
    exp.track = list(dict.fromkeys([*exp.track, *parse_track(args.track, "--track")]))  # the command line adds
    exp.allow_large = args.allow_large
    plugins = plugin_system(exp.plugins)
    if args.launcher != "inprocess":
        return _launch(args, exp, plugins)
    device = resolve_device(args.device)
    jobs = resolve_jobs(args.jobs or "1", device)
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
                  + (f"  ({resumed} resumed from their last state)" if resumed else "")
                  + (f"  tracking: {escape(', '.join(exp.track))}" if exp.track else ""))
    import torch

    before = torch.get_num_threads()
    if threads and jobs == 1:
        torch.set_num_threads(threads)
    reporter = make_reporter(exp, plan, args.quiet, err)
    try:
        with stop, reporter:
            results = runner.run(on_progress=reporter.progress, on_finish=reporter.finish, jobs=jobs,
                                 threads=threads, signals=lambda: stop.count, parallel=run_parallel)
    finally:
        torch.set_num_threads(before)  # a caller of main() in-process keeps its own setting
    return _finish(results, exp, out, err)


def _finish(results: list[dict], exp, out, err) -> int:
    """The end of every gptlab run: the table, what was left to others or failed, the exit status."""
    from rich.markup import escape

    shown = [r for r in results if Path(r["_dir"]).is_dir()]  # a task may have died before making its run's
    if shown:
        _print_compare(shown, exp, out, err)
    else:
        _print_run_table(results, out)
    busy = [r for r in results if r.get("_action") == "busy"]
    if busy:
        err.print(f"[yellow]{len(busy)} run(s) were being trained by another gptlab process and were left to it[/]")
    stopped = [r for r in results if r.get("status") == "interrupted"]
    if stopped:  # only a launcher's tasks get here: in-process, an interrupt ends the command first
        err.print(f"[yellow]{len(stopped)} run(s) were stopped before they finished[/]; rerun the same command to "
                  f"resume them: " + ", ".join(Path(r["_dir"]).name for r in stopped))
    failed = [r for r in results if r.get("status") == "failed"]
    traced = [Path(r["_dir"]).name for r in failed if (Path(r["_dir"]) / "error.txt").is_file()]
    if failed:
        err.print(f"[red]{len(failed)} run(s) failed[/]" + (f"; see error.txt in: {', '.join(traced)}" if traced else ""))
    for r in failed:
        if r.get("_action") == "died":  # a launcher's task that ended without a word: its log says why
            err.print(f"  {escape(str(r.get('error', '')))}")
    return 1 if failed or stopped else 0


def _check_launcher_flags(args: argparse.Namespace) -> None:
    """Flags that belong to one kind of launcher, and submitit itself, before anything is read or written."""
    given = [flag for key, flag in SLURM_FLAGS.items() if getattr(args, key) is not None]
    if args.no_wait:
        given.append("--no-wait")
    if args.launcher == "inprocess" and given:
        raise ConfigError(f"{given[0]} applies to --launcher slurm or local; add --launcher slurm "
                          f"(in-process runs train in this command)")
    if args.launcher != "inprocess" and args.jobs is not None:
        raise ConfigError(f"--jobs applies to --launcher inprocess; with --launcher {args.launcher} every run is a "
                          f"task of its own (--array-parallelism limits how many run at once on Slurm)")
    if args.launcher != "inprocess":
        from ..run.launch import require

        require(args.launcher)


def _launch(args: argparse.Namespace, exp, plugins) -> int:
    """--launcher slurm|local: check and plan here, then train each pending run as a task of one
    job array and wait for them (or not: --no-wait)."""
    import torch
    from rich.markup import escape

    from ..run import launch
    from ..train.devices import cpu_threads, resolve_device
    from ..run.runner import ExperimentRunner

    if args.launcher == "slurm":  # each task resolves --device on its node; the parent only plans and checks
        launch.check_device_name(args.device)
        device = torch.device("cpu")
    else:
        device = resolve_device(args.device)
    cfg = launch.slurm_settings(exp.slurm, {key: getattr(args, key) for key in SLURM_FLAGS}, args.launcher)
    runner = ExperimentRunner(exp, plugins, args.results_dir, device, force=args.force, restart=args.restart,
                              warn=lambda m: sys.stderr.write(f"warning: {m}\n"))
    out, err = _console(), _console(stderr=True)
    for warning in exp.warnings:
        err.print(f"[yellow]warning: {escape(warning)}[/]")
    runner.prepare(write=not args.dry_run)
    if args.dry_run:
        return _dry_run(runner, out, args.overrides)
    plan = runner.plan()
    todo = sum(action != "skip" for _, _, action in plan)
    if args.launcher == "slurm":
        threads = args.threads  # None: each task uses the cores Slurm gives it
    else:  # the local executor starts every task at once: they share this machine's cores
        threads = cpu_threads(args.threads, max(1, todo)) if device.type == "cpu" else None
    parameters = launch.executor_parameters(cfg, args.launcher, exp.name, threads, device.type)
    sub = launch.submit(runner, plan, args.launcher, parameters, args.device, threads)
    time_limit = args.launcher == "slurm" or cfg.time is not None
    kept = len(plan) - todo
    resumed = sum(action == "resume" for _, _, action in plan)
    where = ("a Slurm job array" if args.launcher == "slurm" else "submitit's local executor")
    if sub.tasks and (args.no_wait or not args.quiet):
        asked = _resources(parameters, threads, time_limit)
        (out if args.no_wait else err).print(
            f"[bold]{escape(exp.name)}[/]: {todo} of {len(plan)} runs submitted to {where} "
            f"(job {escape(sub.array_id)}; {escape(asked)})  ->  {escape(str(runner.exp_dir))}"
            + (f"  ({kept} finished runs kept)" if kept else "")
            + (f"  ({resumed} resume from their last state)" if resumed else ""))
    elif not args.quiet:
        err.print(f"[bold]{escape(exp.name)}[/]: nothing to train ({kept} finished runs kept)")
    if args.no_wait:
        if sub.tasks:
            out.print(f"follow them with: gptlab status {escape(str(runner.exp_dir))}")
        return 0
    reporter = make_reporter(exp, plan, args.quiet, err)
    try:
        with reporter:
            done = launch.wait(sub, reporter.progress, reporter.finish)
    except KeyboardInterrupt:
        follow = f"gptlab status {runner.exp_dir}"
        err.print(escape(f"gptlab: stopped waiting; submitted runs are not cancelled ({follow} shows them"
                         + (f", scancel {sub.array_id} cancels them)" if args.launcher == "slurm" else ")")))
        return 130
    results = [done[i] if action != "skip" else _kept(existing) for i, (_, existing, action) in enumerate(plan)]
    return _finish(results, exp, out, err)


def _kept(run_dir: Path) -> dict:
    """A finished run the plan skipped, as the runner reports it."""
    from ..rundir import read_summary

    return (read_summary(run_dir) or {}) | {"_dir": str(run_dir), "_action": "skip"}


def _resources(parameters: dict, threads, time_limit: bool) -> str:
    """What each task asked for, in words."""
    parts = [f"partition {parameters['slurm_partition']}" if "slurm_partition" in parameters else None,
             f"{parameters['gpus_per_node']} GPU" if parameters.get("gpus_per_node") else None,
             f"{threads} CPU thread(s)" if threads else None,
             f"{parameters['timeout_min']} min" if time_limit else None,
             f"{num(parameters['mem_gb'], '{:g}')} GB" if "mem_gb" in parameters else None]
    text = ", ".join(p for p in parts if p) + " per run"
    if "slurm_array_parallelism" in parameters:
        text += f", {parameters['slurm_array_parallelism']} at once"
    return text


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

    caption = [f"overrides for every run: {' '.join(overrides)}" if overrides else "",
               f"tracking: {', '.join(runner.exp.track)}" if runner.exp.track else ""]
    table = Table(title=Text(f"{runner.exp.name}: {len(runner.exp.runs)} runs (dry run, nothing trained)"),
                  caption=Text("; ".join(c for c in caption if c)) if any(caption) else None)
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
