"""The ``gptlab`` command. This package owns argument parsing and printing; the library modules
it calls take plain arguments.

One module per group of subcommands, each with ``add_parsers(sub, common)`` that adds its
parsers and sets ``handler`` on them:

  run.py       gptlab run           train an experiment, live progress, the final table
  prepare.py   gptlab prepare       tokenize or verify an experiment's corpora (and the bar run shows)
  results.py   gptlab compare/show  tables and curves from run directories (no torch)
  report.py    gptlab report        the tables and every run's curves on one HTML page (no torch)
  table.py     the comparison table as people read it (gptlab compare, the end of gptlab run)
  runs.py      gptlab runs/clean    list runs; remove the ones a filter names
  status.py    gptlab status        queued, running and finished runs (job ids from .submitit/jobs.json)
  generate.py  gptlab generate      sample from a run's checkpoint
  export.py    gptlab export        a run's checkpoint as a Hugging Face model directory
  plugins.py   gptlab plugins/components
  bench.py     gptlab bench attention/model

Errors a user can fix (``GptlabError``) print one line and exit 2 everywhere, in ``main``;
nothing heavy (torch, pandas) is imported until a handler needs it, so ``gptlab --help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..errors import GptlabError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2.

    A parser without subcommands also accepts its positionals after options, so
    ``gptlab run EXP.yaml --device cpu train.steps=50`` and ``gptlab bench model gpt2 --compile
    n_layers=4`` both work.
    """

    _intermixing = False

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back here
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --debug given before the subcommand is not reset by the subcommand's default
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    return common


def build_parser() -> argparse.ArgumentParser:
    from . import bench, export, generate, plugins, prepare, report, results, run, runs, status

    p = Parser(prog="gptlab", description="A plugin-based experiment registry for GPT architecture variants.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    common = common_options()
    for module in (run, prepare, results, report, runs, status, generate, export, plugins, bench):
        module.add_parsers(sub, common)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    # OpenMP threads that spin while they wait collapse when another process holds a core (a 2-core
    # machine with one busy neighbour ran 3-4x slower); sleeping waiters cost ~5% alone. Must be
    # set before torch loads its OpenMP runtime, which is why it is here; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _sigterm_is_an_interrupt()
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0") or 0) > 0:  # torchrun's other processes: rank 0 alone speaks
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
    try:
        return args.handler(args)
    except GptlabError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"gptlab: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("gptlab: interrupted; finished runs are kept, rerun the same command to resume\n")
        return 130


def _sigterm_is_an_interrupt() -> None:
    """SIGTERM ends every command as Ctrl-C does: one line and exit status 130, at any moment
    (training installs its own handler on top, to stop at a step boundary)."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (gptlab.cli.main called from a thread): leave it
        pass
