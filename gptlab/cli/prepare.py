"""``gptlab prepare``: tokenize (or verify) every corpus an experiment uses, without training.

The progress bar is also what ``gptlab run`` shows while it prepares a corpus that is missing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any



def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("prepare", parents=[common],
                       help="tokenize (or verify) every dataset of an experiment, without training")
    p.add_argument("experiment", type=Path, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for gptlab run")
    p.add_argument("--results-dir", type=Path, default=Path("results"),
                   help="whose token cache (RESULTS_DIR/.cache/tokens) to fill (default: results)")
    p.add_argument("--plugins-dir", type=Path, action="append", default=[], help="extra plugin folder (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary lines")
    p.set_defaults(handler=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..data.tokens import prepare_tokens
    from ..run.preflight import check_writable, data_key, experiment_dir
    from ..run.runner import ExperimentRunner

    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    runner = ExperimentRunner.open(args.experiment, args.overrides, results_dir=args.results_dir,
                                   plugin_dirs=args.plugins_dir, device="cpu")
    check_writable(runner.results_dir)
    for folder in (runner.results_dir / ".cache", runner.cache_dir):
        if folder.exists():
            runner.check_inside(folder)
    runner.remove_orphans()
    seen: set = set()
    with PreparationBar(err, quiet=args.quiet) as bar:
        for spec in runner.exp.runs:
            key = data_key(spec)
            if key in seen:
                continue
            seen.add(key)
            started, label = time.perf_counter(), corpus_label(spec.data)
            report = bar.for_data(spec.data)
            data = prepare_tokens(spec.data, runner.plugins, runner.cache_dir, base_dir=experiment_dir(runner.exp),
                                  progress=report)
            seconds = time.perf_counter() - started
            verb = "prepared" if report.called else "verified" if data.manifest is not None else "ready"
            out.print(f"{label}: {verb} in {seconds:.1f} s: {_summary(data)}", soft_wrap=True)
    out.print(f"token cache: {runner.cache_dir}", soft_wrap=True)
    return 0


def corpus_label(data: Any) -> str:
    return f"{data.dataset.name} + {data.tokenizer.name}"


def _summary(data: Any) -> str:
    from ..data.prepare import describe

    if data.manifest is not None:
        return describe(data.manifest)
    return (f"{len(data.train):,} train + {len(data.val):,} val tokens (one array; validation: its "
            f"last {len(data.val) / max(1, len(data.train) + len(data.val)):.0%})")


class _Report:
    """The callback one corpus's preparation calls after every chunk."""

    def __init__(self, bar: "PreparationBar", label: str) -> None:
        self.bar, self.label, self.task, self.called = bar, label, None, False

    def __call__(self, chars: int, docs: int, tokens: int) -> None:
        self.called = True
        self.bar.update(self, chars, docs, tokens)


class PreparationBar:
    """A rich progress line per corpus being prepared (characters read, documents, tokens, rate) on
    a terminal; elsewhere one plain line per corpus when it is done; nothing with ``quiet``."""

    def __init__(self, console: Any, quiet: bool = False) -> None:
        self.console, self.quiet, self.progress = console, quiet, None
        self.reports: list[_Report] = []

    def __enter__(self) -> "PreparationBar":
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                     console=self.console, transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for report in self.reports:
            if report.called and self.progress is not None:
                self.progress.update(report.task, total=1, completed=1)
            elif report.called and not self.quiet:
                self.console.print(f"{report.label}: {report.counts}", soft_wrap=True)
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def for_data(self, data: Any) -> _Report:
        self.reports.append(_Report(self, f"preparing {corpus_label(data)}"))
        return self.reports[-1]

    def for_spec(self, spec: Any) -> _Report:
        """What ``gptlab run`` hands its runner (``runner.progress``)."""
        return self.for_data(spec.data)

    def update(self, report: _Report, chars: int, docs: int, tokens: int) -> None:
        counts = f"{docs:,} docs · {tokens:,} tokens · {chars:,} chars"
        if self.progress is not None:
            if report.task is None:
                report.task = self.progress.add_task(report.label, total=None, counts=counts)
            self.progress.update(report.task, counts=counts)
        report.counts = counts
