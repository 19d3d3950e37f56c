"""The ``gptlab`` command: run experiments, compare and show results, list plugins and components."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from .bench import add_parser as add_bench_parser
from .bench import cmd_bench
from .cli_results import COMMANDS as RESULT_COMMANDS
from .cli_results import add_parsers as add_result_parsers
from .errors import GptlabError

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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptlab", description="A plugin-based experiment registry for GPT architecture variants.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="train every variant of an experiment", epilog=EXPERIMENT_FORMAT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("experiment", type=Path, help="experiment YAML file")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    r.add_argument("--results-dir", type=Path, default=Path("results"), help="where runs are stored (default: results)")
    r.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    r.add_argument("--plugins-dir", type=Path, action="append", default=[], help="extra plugin folder (repeatable)")
    r.add_argument("--force", action="store_true", help="rerun runs that already finished")
    r.add_argument("--dry-run", action="store_true", help="list the runs and how they differ; train nothing")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    for name, helptext in (("plugins", "list loaded plugins, where they came from and their versions"),
                           ("components", "list registered components with their one-line docs")):
        c = sub.add_parser(name, help=helptext)
        if name == "components":
            c.add_argument("kind", nargs="?", help="only this kind (attention, position, norm, ...)")
        c.add_argument("--json", action="store_true", help="print JSON")
        c.add_argument("--plugins-dir", type=Path, action="append", default=[], help="extra plugin folder")
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_result_parsers(sub)
    add_bench_parser(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse stops filling a positional list at the first option)
    if args.command == "run":
        args.overrides += [x for x in extra if not x.startswith("-") and "=" in x]
        extra = [x for x in extra if x.startswith("-") or "=" not in x]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except GptlabError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"gptlab: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("gptlab: interrupted; finished runs are kept, rerun the same command to resume\n")
        return 130


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .experiment import load_experiment
    from .plugin_manager import build_plugin_system
    from .runner import ExperimentRunner, check_components

    exp = load_experiment(args.experiment, args.overrides)
    plugins = build_plugin_system(plugin_dirs=args.plugins_dir, extra=exp.plugins,
                                  base_dir=args.experiment.resolve().parent)
    device = resolve_device(args.device)
    runner = ExperimentRunner(exp, plugins, args.results_dir, device, force=args.force)
    out = _console()
    if args.dry_run:
        check_components(exp, plugins)
        return _dry_run(runner, out, args.overrides)
    runner.prepare()
    err = _console(stderr=True)
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
        diff = ", ".join(f"{k}={_fmt_value(v)}" for k, v in spec.changes.items()) or "-"
        table.add_row(spec.variant, str(spec.seed), spec.config_hash, action, diff)
    out.print(table)
    return 0


def _fmt_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


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
    from .compare import print_compare

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
        def f(key, fmt="{:.4f}"):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "n/a"
        table.add_row(r.get("variant", "?"), str(r.get("seed")), r.get("status", "?"), f("final_val_loss"),
                      f("best_val_loss"), f("tokens_per_s", "{:,.0f}"), f("parameters", "{:,}"),
                      f("wall_time_s", "{:.1f}"), "(kept)" if r.get("_action") == "skip" else "")
    out.print(table)


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugin_manager import build_plugin_system

    system = build_plugin_system(plugin_dirs=args.plugins_dir)
    rows = [{"name": p.name, "source": p.source, "location": p.location, "version": p.version,
             "components": p.components} for p in system.plugins]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(rows)} plugins (in load order)")
    for col in ("name", "source", "version", "registers", "location"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["source"], r["version"], ", ".join(r["components"]), r["location"])
    _console().print(table)
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    from .plugin_manager import build_plugin_system
    from .registry import KINDS

    system = build_plugin_system(plugin_dirs=args.plugins_dir)
    if args.kind and args.kind not in KINDS:
        from .errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown component kind '{args.kind}'{did_you_mean(args.kind, KINDS)}; "
                          f"kinds: {', '.join(KINDS)}")
    entries = system.registry.entries(args.kind)
    rows = [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "doc": e.doc,
             "overrides": e.overrides} for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="registered components")
    for col in ("kind", "name", "plugin", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["kind"], r["name"], r["plugin"] + (f" (overrides {r['overrides']})" if r["overrides"] else ""),
                      r["doc"])
    _console().print(table)
    return 0


COMMANDS = {"run": cmd_run, "plugins": cmd_plugins, "components": cmd_components, **RESULT_COMMANDS, "bench": cmd_bench}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
