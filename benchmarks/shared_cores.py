"""A training run alone and beside one CPU-bound neighbour: how much slower does it get?

    python benchmarks/shared_cores.py [--steps 120] [--repeats 2]

Each configuration trains the same small model (preset micro, one seed) through ``gptlab run``
in a fresh process, once on an idle machine and once while another process spins on one core,
and prints the training tokens/s (from summary.json) and the slowdown. The configurations:
gptlab's defaults (threads = the cores this process may use, OpenMP waiters sleep), and the same
thread count with spinning OpenMP waiters (``OMP_WAIT_POLICY=ACTIVE``), which is what collapses.
Load average and core count are printed; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"gptlab default": {}, "spinning OpenMP waiters": {"OMP_WAIT_POLICY": "ACTIVE"}}


def train(root: Path, steps: int, env_extra: dict, tag: str) -> float:
    exp = root / f"{tag}.yaml"
    exp.write_text(json.dumps({"name": tag, "model": {"preset": "micro"},
                               "train": {"steps": steps, "batch_size": 16, "log_every": 20, "eval_every": steps,
                                         "eval_batches": 1, "checkpoint_every": 0}, "seeds": [0]}))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    subprocess.run([sys.executable, "-m", "gptlab", "run", str(exp), "--device", "cpu", "--quiet",
                    "--results-dir", str(root / "results")], env=env, check=True, capture_output=True)
    (summary,) = (root / "results" / tag).glob("*/summary.json")
    return json.loads(summary.read_text())["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"cores this process may use: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'configuration':<26} {'alone tok/s':>12} {'beside neighbour':>17} {'slowdown':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        root, n = Path(tmp), 0
        for label, extra in CONFIGS.items():
            alone, busy = [], []
            for _ in range(args.repeats):
                n += 1
                alone.append(train(root, args.steps, extra, f"r{n}"))
                neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(0.5)
                    n += 1
                    busy.append(train(root, args.steps, extra, f"r{n}"))
                finally:
                    neighbour.kill()
                    neighbour.wait()
            a, b = statistics.median(alone), statistics.median(busy)
            print(f"{label:<26} {a:>12,.0f} {b:>17,.0f} {a / b:>8.2f}x")


if __name__ == "__main__":
    main()
