"""``gptlab run``: train an experiment with live progress, then print its comparison table."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

from ..errors import ConfigError, GptlabError
from ..fmt import num, yaml_value
from ..config.run import SLURM_FLAGS, SlurmConfig
from ..rundir import FAILED, INTERRUPTED, run_key
from .prepare import PreparationBar
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
  tune: {key: train.lr, values: [1e-3, 3e-3, 1e-2], seeds: [100], metric: val_loss}   # optional: each
                                 # variant trains at each value on the tuning seeds, then its seeds at its best
  scale: {sizes: [nano, micro, mini], tokens_per_param: 20}   # optional: a scaling ladder (3+ sizes)
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
    from ..run.experiment import reading_once
    from ..run.runner import ExperimentRunner

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    _check_launcher_flags(args)
    stop = _GracefulStop()
    out, err = _console(), _console(stderr=True)
    with reading_once():  # the experiment file is read once for the whole command, its final table included
        runner = ExperimentRunner.open(
            args.experiment, args.overrides, results_dir=args.results_dir, plugin_dirs=args.plugins_dir,
            track=args.track, allow_large=args.allow_large, force=args.force, restart=args.restart,
            device="cpu" if args.launcher == "slurm" else args.device,  # a Slurm task resolves it on its node
            should_stop=lambda: stop.requested, warn=lambda m: sys.stderr.write(f"warning: {m}\n"))
        executor = _executor(args, runner)  # its flags are checked before anything is written
        for warning in runner.exp.warnings:
            err.print(f"[yellow]warning: {_escape(warning)}[/]")
        with PreparationBar(err, quiet=args.quiet) as bar:  # a corpus not yet tokenized shows its progress
            runner.progress = bar.for_spec
            plan = runner.prepare(write=not args.dry_run)  # a dry run makes every check the real run makes
        if args.dry_run:
            return _dry_run(runner, plan, out, args.overrides)
        if args.launcher != "inprocess":
            return _launch(args, runner, plan, executor, out, err)
        return _train_here(args, runner, plan, executor, stop, out, err)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _Here(NamedTuple):
    """--launcher inprocess: how many runs train at once (--jobs) and the CPU threads of each."""

    jobs: int
    threads: Optional[int]


def _executor(args: argparse.Namespace, runner) -> "_Here | SlurmConfig":
    """What trains the plan, as the flags say: this process (--jobs, --threads), or a launcher's
    tasks (the experiment's slurm: section with the flags over it)."""
    if args.launcher != "inprocess":
        from ..run import launch

        if args.launcher == "slurm":
            launch.check_device_name(args.device)
        return launch.slurm_settings(runner.exp.slurm, {key: getattr(args, key) for key in SLURM_FLAGS}, args.launcher)
    from ..train.devices import cpu_threads, resolve_jobs

    jobs = resolve_jobs(args.jobs or "1", runner.device)
    return _Here(jobs, cpu_threads(args.threads, jobs) if runner.device.type == "cpu" else None)


def _counts(plan: list) -> tuple[int, int]:
    """(finished runs kept, runs resumed) of a plan."""
    return sum(p.action == "skip" for p in plan), sum(p.action == "resume" for p in plan)


def _train_here(args: argparse.Namespace, runner, plan: list, here: _Here, stop: "_GracefulStop", out, err) -> int:
    """--launcher inprocess: train the pending runs here, --jobs of them at once in worker processes."""
    from ..run.workers import run_parallel

    exp, (jobs, threads) = runner.exp, here
    kept, resumed = _counts(plan)
    if not args.quiet:
        err.print(f"[bold]{_escape(exp.name)}[/]: {len(exp.runs)} runs on {runner.device}"
                  + (f", {threads} CPU thread(s) per run" if threads else "") + (f", {jobs} at once" if jobs > 1 else "")
                  + f"  ->  {_escape(str(runner.exp_dir))}"
                  + (f"  ({kept} finished runs kept)" if kept else "")
                  + (f"  ({resumed} resumed from their last state)" if resumed else "")
                  + (f"  tracking: {_escape(', '.join(exp.track))}" if exp.track else ""))
    reporter = make_reporter(exp, plan, args.quiet, err)
    with stop, reporter:
        outcomes = runner.run(on_progress=reporter.progress, on_finish=reporter.finish, jobs=jobs, threads=threads,
                              signals=lambda: stop.count, parallel=run_parallel, on_plan=reporter.extend)
    return _finish(outcomes, runner.exp, out, err)


def _finish(outcomes: list, exp, out, err) -> int:
    """The end of every gptlab run: the table, what was left to others or failed, the exit status."""
    shown = [o for o in outcomes if o.exists]  # a task may have died before making its run's directory
    keys = {run_key(spec.config_hash, spec.seed) for spec in exp.comparison_runs}
    compared = [o for o in shown if run_key(o.spec.config_hash, o.spec.seed) in keys]
    if exp.tune is not None and compared:  # the tuning runs stay out of the table (compare --all shows them)
        shown = compared
    if shown:
        _print_compare(shown, exp, out, err)
    else:
        _print_run_table(outcomes, out)
    busy = [o for o in outcomes if o.action == "busy"]
    if busy:
        err.print(f"[yellow]{len(busy)} run(s) were being trained by another gptlab process and were left to it[/]")
    stopped = [o for o in outcomes if o.status == INTERRUPTED]
    if stopped:  # only a launcher's tasks get here: in-process, an interrupt ends the command first
        err.print(f"[yellow]{len(stopped)} run(s) were stopped before they finished[/]; rerun the same command to "
                  f"resume them: " + ", ".join(o.run_dir.name for o in stopped))
    failed = [o for o in outcomes if o.status == FAILED]
    traced = [o.run_dir.name for o in failed if o.traceback]
    if failed:
        err.print(f"[red]{len(failed)} run(s) failed[/]" + (f"; see error.txt in: {', '.join(traced)}" if traced else ""))
    for o in failed:
        if o.action == "died":  # a launcher's task that ended without a word: its log says why
            err.print(f"  {_escape(str(o.summary.get('error', '')))}")
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
        from ..run.launch import check_launcher

        check_launcher(args.launcher)


def _launch(args: argparse.Namespace, runner, plan: list, cfg: SlurmConfig, out, err) -> int:
    """--launcher slurm|local: train each pending run as a task of one job array and wait for them
    (or not: --no-wait)."""
    from ..run import launch

    exp = runner.exp
    todo = sum(p.action != "skip" for p in plan)
    threads = launch.task_threads(args.launcher, args.threads, todo, runner.device.type)
    parameters = launch.executor_parameters(cfg, args.launcher, exp.name, threads, runner.device.type)
    sub = launch.submit(runner, plan, args.launcher, parameters, args.device, threads)
    kept, resumed = _counts(plan)
    where = ("a Slurm job array" if args.launcher == "slurm" else "submitit's local executor")
    if sub.tasks and (args.no_wait or not args.quiet):
        asked = _resources(parameters, threads, args.launcher == "slurm" or cfg.time is not None)
        (out if args.no_wait else err).print(
            f"[bold]{_escape(exp.name)}[/]: {todo} of {len(plan)} runs submitted to {where} "
            f"(job {_escape(sub.array_id)}; {_escape(asked)})  ->  {_escape(str(runner.exp_dir))}"
            + (f"  ({kept} finished runs kept)" if kept else "")
            + (f"  ({resumed} resume from their last state)" if resumed else ""))
    elif not args.quiet:
        err.print(f"[bold]{_escape(exp.name)}[/]: nothing to train ({kept} finished runs kept)")
    if exp.tune is not None and not args.quiet:
        err.print(f"tune: the comparison runs are submitted once the tuning runs they wait for have finished"
                  + (" (run the same command again then)" if args.no_wait else ""))
    if args.no_wait:
        if sub.tasks:
            out.print(f"follow them with: gptlab status {_escape(str(runner.exp_dir))}")
        return 0
    reporter = make_reporter(exp, plan, args.quiet, err)
    done: dict = {}
    try:
        with reporter:
            while True:
                done.update(launch.wait(sub, reporter.progress, reporter.finish))
                added = runner.next_phase()  # tune: the comparison runs of the variants just decided
                if not [p for p in added if p.action != "skip"]:
                    break
                reporter.extend(added)
                sub = launch.submit(runner, added, args.launcher, parameters, args.device, threads)
    except KeyboardInterrupt:
        follow = f"gptlab status {runner.exp_dir}"
        err.print(_escape(f"gptlab: stopped waiting; submitted runs are not cancelled ({follow} shows them"
                          + (f", scancel {sub.array_id} cancels them)" if args.launcher == "slurm" else ")")))
        return 130
    return _finish(runner.outcomes(done), runner.exp, out, err)


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


def _dry_run(runner, plan: list, out, overrides: list[str]) -> int:
    from rich.table import Table
    from rich.text import Text

    caption = [f"overrides for every run: {' '.join(overrides)}" if overrides else "",
               f"tracking: {', '.join(runner.exp.track)}" if runner.exp.track else ""]
    table = Table(title=Text(f"{runner.exp.name}: {len(runner.exp.runs)} runs (dry run, nothing trained)"),
                  caption=Text("; ".join(c for c in caption if c)) if any(caption) else None)
    for col in ("variant", "seed", "hash", "action", "differs from base"):
        table.add_column(col)
    for planned in plan:
        spec = planned.spec
        diff = ", ".join(f"{k}={yaml_value(v)}" for k, v in spec.changes.items()) or "-"
        table.add_row(*(Text(cell) for cell in (spec.variant, str(spec.seed), spec.config_hash, planned.action, diff)))
    out.print(table)
    if runner.exp.tune is not None:
        _dry_run_tuning(runner, out)
    return 0


def _dry_run_tuning(runner, out) -> None:
    """What the tuning runs have decided so far, and the comparison runs still to be planned."""
    from ..run.tuning import describe

    exp = runner.exp
    tune, choices = exp.tune, runner.choices or {}
    out.print(_escape(f"tune: each variant trains at {tune.key} = {', '.join(yaml_value(v) for v in tune.values)} "
                      f"on seed(s) {', '.join(map(str, tune.seeds))}; the value with the lowest {tune.metric} "
                      f"is the one its seeds {', '.join(str(s) for s in sorted({s.seed for c in exp.candidates.values() for s in c[0].comparison}))} train at"))
    for line in describe(tune, choices):
        out.print(_escape(f"  {line}"))
    waiting = [v for v, c in choices.items() if not c.decided]
    if waiting:
        per = len(next(iter(exp.candidates.values()))[0].comparison)
        out.print(_escape(f"then {per * len(waiting)} comparison run(s) ({per} per variant: "
                          f"{', '.join(waiting)}), planned once their tuning runs have finished"))


def _print_compare(outcomes: list, exp, out, err) -> None:
    """End a run with the comparison table of this invocation's runs (the experiment's compare block)."""
    from .table import print_compare

    try:
        print_compare([str(o.run_dir) for o in outcomes], **exp.compare)
    except GptlabError as exc:  # a bad compare block must not hide finished training
        err.print(f"[yellow]comparison table skipped: {exc}[/]")
        _print_run_table(outcomes, out)


def _print_run_table(outcomes: list, out) -> None:
    from rich.table import Table

    table = Table(title="runs")
    for col in ("variant", "seed", "status", "final val", "best val", "tok/s", "params", "wall s", ""):
        table.add_column(col, justify="right" if col not in ("variant", "status", "") else "left")
    for o in outcomes:
        def f(key, spec="{:.4f}"):
            v = o.summary.get(key)
            return num(v if isinstance(v, (int, float)) else None, spec)
        table.add_row(o.summary.get("variant", o.spec.variant), str(o.summary.get("seed", o.spec.seed)),
                      o.status or "?", f("final_val_loss"), f("best_val_loss"), f("tokens_per_s", "{:,.0f}"),
                      f("parameters", "{:,}"), f("wall_time_s", "{:.1f}"), "(kept)" if o.action == "skip" else "")
    out.print(table)
