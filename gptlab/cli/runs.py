"""``gptlab runs`` lists the runs of experiments; ``gptlab clean`` removes the ones a filter names.

Smoke runs, runs with command-line overrides and runs of an earlier version of an experiment file
stay on disk beside the real ones (``gptlab compare`` leaves them out by default); these two
commands let a researcher see them and remove them on purpose. Nothing is deleted that no filter
named, nothing while another process trains it, and never without showing the list first.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from .. import fmt
from ..errors import ConfigError
from ..rundir import STATUSES

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("runs", parents=[common], help="list runs: variant, seed, status, overrides, age")
    r.add_argument("paths", nargs="*", type=Path, metavar="EXP_DIR",
                   help="experiment directories (default: every experiment under --results-dir)")
    r.add_argument("--results-dir", type=Path, default=Path("results"), help="default: results")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(handler=cmd_runs)

    c = sub.add_parser("clean", parents=[common], help="remove the runs the filters name (all filters must match)",
                       description="Remove runs that every given filter selects. The list is printed first; "
                                   "deleting needs a yes at the prompt or --yes.")
    c.add_argument("paths", nargs="+", type=Path, metavar="EXP_DIR", help="experiment directories")
    c.add_argument("--overrides", action="store_true",
                   help="runs made with command-line overrides that the experiment file does not define")
    c.add_argument("--outdated", action="store_true",
                   help="runs the experiment file, as it stands now, does not define (overrides or an older version)")
    c.add_argument("--status", action="append", default=[], metavar="STATUS",
                   help=f"runs with this status ({', '.join(s for s in STATUSES if s != 'running')}); repeatable")
    c.add_argument("--variant", action="append", default=[], metavar="NAME", help="runs of this variant; repeatable")
    c.add_argument("--older-than", metavar="AGE", type=parse_age,
                   help="runs last changed longer ago than AGE, e.g. 30m, 12h, 7d, 2w")
    c.add_argument("--yes", action="store_true", help="delete without asking")
    c.set_defaults(handler=cmd_clean)


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected an age such as 30m, 12h, 7d or 2w, got {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def _runs(paths: list, results_dir: Path):
    from ..run.experiment import current_definition
    from ..results.frame import load_results

    return load_results(*paths, results_dir=results_dir, defined_by=current_definition)


def _made_with(row: Any) -> str:
    if row.get("tuning") and not row["defined"]:
        return "the file's tune: block"
    if row["defined"]:
        return "the file" + (f" ({row['overrides']})" if row["overrides"] else "")
    return row["overrides"] or "an earlier version of the file"


def _rows(df) -> list[dict]:
    now = time.time()
    return [{"experiment": r["experiment"], "variant": r["variant"], "seed": r["seed"], "status": r["status"],
             "made_with": _made_with(r), "overrides": r["overrides"], "defined": bool(r["defined"]),
             "age": fmt.duration(max(0.0, now - r["finished_at"])), "run_dir": r["run_dir"]}
            for _, r in df.iterrows()]


def _print(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for col in ("experiment", "variant", "seed", "status", "made with", "age", "run"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(Text(str(v)) for v in (r["experiment"], r["variant"], r["seed"], r["status"],
                                               r["made_with"], r["age"], Path(r["run_dir"]).name)))
    Console(highlight=False).print(table)


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    rows = _rows(_runs(args.paths, args.results_dir))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print(rows, f"{len(rows)} runs")
    return 0


def _link_below(run_dir: Path, roots: list) -> Any:
    """The first symbolic link on the way from the folder named on the command line down to
    ``run_dir`` (the run folder itself included), or None. The folder named is the user's choice
    and may be a link; nothing below it is followed for deleting."""
    for root in map(Path, roots):
        if run_dir == root or run_dir.is_relative_to(root):
            parts = run_dir.relative_to(root).parts
            for i in range(len(parts)):
                step = root.joinpath(*parts[:i + 1])
                if step.is_symlink():
                    return step
            return None
    return run_dir  # not under any folder named: never deleted


def cmd_clean(args: argparse.Namespace) -> int:
    import shutil

    from ..rundir import RUNNING, lock_held

    unknown = [s for s in args.status if s not in STATUSES or s == RUNNING]
    if unknown:
        raise ConfigError(f"--status {unknown[0]}: choose from {', '.join(s for s in STATUSES if s != RUNNING)} "
                          f"(a running run is never removed)")
    if not (args.overrides or args.outdated or args.status or args.variant or args.older_than is not None):
        raise ConfigError("name at least one filter (--overrides, --outdated, --status, --variant, --older-than); "
                          "clean never removes runs no filter selects")
    df = _runs(args.paths, Path("results"))
    unknown = sorted(set(args.variant) - set(df["variant"]))
    if unknown:
        raise ConfigError(f"--variant {unknown[0]}: no such variant in {', '.join(map(str, args.paths))}; "
                          f"variants: {', '.join(sorted(set(map(str, df['variant']))))}")
    now = time.time()
    chosen = df[[(not args.overrides or (not r["defined"] and bool(r["overrides"])))
                 and (not args.outdated or not r["defined"])
                 and (not args.status or r["status"] in args.status)
                 and (not args.variant or r["variant"] in args.variant)
                 and (args.older_than is None or now - r["finished_at"] > args.older_than)
                 and r["status"] != RUNNING
                 for _, r in df.iterrows()]]
    rows, links = [], {}
    for row in _rows(chosen):  # a run reached through a link below the folders named is never deleted
        link = _link_below(Path(row["run_dir"]), args.paths)
        if link is None:
            rows.append(row)
        else:
            links[link] = links.get(link, 0) + 1
    for link, n in links.items():
        sys.stderr.write(f"gptlab: warning: skipping {link}: a symbolic link (clean never deletes through links); "
                         f"{n} run(s) there kept\n")
    if not rows:
        print("no run matches; nothing removed")
        return 0
    _print(rows, f"{len(rows)} of {len(df)} runs would be removed")
    if not args.yes:
        try:
            answer = input(f"remove these {len(rows)} runs? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed (answer y at the prompt, or pass --yes)")
            return 0
    removed = 0
    for r in rows:
        run_dir = Path(r["run_dir"])
        if run_dir.is_symlink() or lock_held(run_dir):  # never through a link, never under a live run
            sys.stderr.write(f"gptlab: kept {run_dir}: {'a symlink' if run_dir.is_symlink() else 'being trained'}\n")
            continue
        shutil.rmtree(run_dir)
        removed += 1
    print(f"removed {removed} run(s)")
    return 0
