"""``gptlab status``: where each run of an experiment stands, queued runs included.

After ``gptlab run --launcher slurm --no-wait`` nothing on this machine follows the job array;
this reads the run directories together with the job ids ``gptlab run`` recorded
(``results/<experiment>/.submitit/jobs.json``), so a run that waits in the queue and has no
directory yet is listed as queued, and a requeued run is told apart from an abandoned one.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("status", parents=[common], help="queued, running and finished runs of experiments",
                       description="One line per run: its status (queued, running, requeued, completed, diverged, "
                                   "failed, interrupted), step, validation loss and the job it was submitted as.")
    s.add_argument("paths", nargs="+", type=Path, metavar="EXP_DIR", help="experiment folders, e.g. results/NAME")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ..run.jobs import experiment_status

    by_experiment = [(path, experiment_status(path)) for path in args.paths]
    if args.json:
        print(json.dumps([row for _, rows in by_experiment for row in rows], indent=2, default=str))
        return 0
    for path, rows in by_experiment:
        _print(path, rows)
    return 0


def _print(path: Path, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .. import fmt

    counts = Counter(r["status"] for r in rows)
    title = f"{path}: {len(rows)} runs" + "".join(f" · {n} {status}" for status, n in sorted(counts.items()))
    table = Table(title=Text(title), title_justify="left")
    for col in ("variant", "seed", "status", "step", "val loss", "job", "run"):
        table.add_column(col, overflow="fold", justify="right" if col in ("seed", "step", "val loss") else "left")
    for r in rows:
        step = "-" if r["step"] is None else f"{r['step']}/{r['steps']}" if r["steps"] else str(r["step"])
        job = "-" if r["job_id"] is None else r["job_id"] + (f" ({r['job_state']})" if r["job_state"] else "")
        status = r["status"] + (f": {r['note']}" if r["note"] else "")
        table.add_row(*(Text(str(v)) for v in (r["variant"], r["seed"], status, step,
                                               fmt.num(r["val_loss"], "{:.4f}"), job, Path(r["run_dir"]).name)))
    Console(highlight=False).print(table)
