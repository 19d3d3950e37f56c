"""How long the commands that need no model take to start, and whether they import torch.

    python benchmarks/cli_startup.py [--repeats 5] [--results-dir DIR]

Each command runs ``--repeats`` times in a fresh interpreter; the median wall time is printed
beside ``python -c pass`` (the interpreter's own start-up) and ``import torch``, measured in the
same run so a busy machine shifts every row alike. A command that imports torch is marked. With
``--results-dir`` pointing at finished runs, ``compare`` and ``show`` on the first experiment
there are timed too.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(argv: list[str], repeats: int) -> tuple[float, bool]:
    """Median seconds over ``repeats`` runs, and whether torch was imported (from -X importtime)."""
    times, torch_seen = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        torch_seen |= bool(re.search(r"\|\s+torch$", proc.stderr, re.M))
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.splitlines()[-1:]}")
    return statistics.median(times), torch_seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results-dir", type=Path, default=None, help="finished runs, to time compare and show")
    args = ap.parse_args()
    rows = [("python -c pass", ["-c", "pass"]), ("import torch", ["-c", "import torch"]),
            ("gptlab --help", ["-m", "gptlab", "--help"]),
            ("gptlab components", ["-m", "gptlab", "components"]),
            ("gptlab plugins", ["-m", "gptlab", "plugins"])]
    if args.results_dir is not None:
        exp = next(p for p in sorted(args.results_dir.iterdir()) if p.is_dir() and not p.name.startswith("."))
        rows += [("gptlab compare EXP", ["-m", "gptlab", "compare", str(exp)]),
                 ("gptlab show EXP", ["-m", "gptlab", "show", str(exp)])]
    print(f"{'command':<22} {'median s':>9}  imports torch   (python {sys.version.split()[0]}, "
          f"{args.repeats} runs each)")
    for label, argv in rows:
        seconds, torch_seen = timed(argv, args.repeats)
        print(f"{label:<22} {seconds:>9.3f}  {'yes' if torch_seen else 'no'}")


if __name__ == "__main__":
    main()
