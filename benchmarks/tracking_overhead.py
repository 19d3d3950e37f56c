"""What the tracking sinks cost a run: wall time with no sink, with each sink, and with all three.

    python benchmarks/tracking_overhead.py [--steps 300] [--rounds 4] [--threads N]

Every configuration trains the same tiny experiment (preset nano, one seed, a metrics row every 10
steps, an evaluation every 50; ~5 s on 2 CPU cores at 300 steps) through ``gptlab run``, in this
one process: the sinks' packages are imported, W&B's service process started and MLflow's SQLite
database created once, in a warm-up round of 20-step runs that is not counted (import times are
measured and printed on their own). Then ``--rounds`` rounds train every configuration again, in a
rotating order so that drift on a shared machine hits them all alike. Printed per configuration,
as medians over the rounds: the command's wall time and CPU time (every thread of this process;
W&B's service process is not in it), the run's wall time (summary.json wall_time_s), the time
spent inside the sinks' hooks (summary.json hook_seconds; W&B's and MLflow's writes run on a thread
of their own and are not in it), and the overhead against no sink. Last, the sinks' own work is
replayed without training (one run's start, rows and end through the same hook calls) and its CPU
time, W&B's service process included, is compared with a run's: a bound on what the sinks can cost
that the noise of a shared machine does not blur. W&B runs offline and MLflow uses a SQLite file in
a temporary folder, W&B's error reporting and MLflow's telemetry are off: nothing is sent anywhere.
Needs the tensorboard, wandb and mlflow extras.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "mlflow": ["mlflow"],
           "all three": ["tensorboard", "wandb", "mlflow"]}


def experiment(root: Path, name: str, steps: int) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(json.dumps({
        "name": name, "model": {"preset": "nano"},
        "train": {"steps": steps, "batch_size": 8, "log_every": 10, "eval_every": 50, "eval_batches": 2,
                  "checkpoint_every": 0},
        "seeds": [0]}))
    return path


def train(root: Path, name: str, steps: int, sinks: list[str], threads) -> dict:
    """One ``gptlab run`` in this process: command wall s and CPU s (every thread of this process),
    the run's wall s, and the seconds spent in lifecycle hooks."""
    from gptlab.cli import main

    argv = ["run", str(experiment(root, name, steps)), "--results-dir", str(root / "results"), "--device", "cpu",
            "--quiet"] + (["--threads", str(threads)] if threads else []) + [a for s in sinks for a in ("--track", s)]
    out = io.StringIO()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(argv)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if rc != 0:
        raise SystemExit(f"gptlab run failed ({rc}):\n{out.getvalue()}")
    (summary,) = (root / "results" / name).glob("*/summary.json")
    s = json.loads(summary.read_text())
    if s.get("hook_errors"):
        raise SystemExit(f"a sink failed: {s['hook_errors']}")
    return {"wall": wall, "cpu": cpu, "run": s["wall_time_s"], "hooks": sum((s.get("hook_seconds") or {}).values())}


def service_cpu() -> float:
    """CPU seconds used so far by W&B's service processes under this one (time.process_time misses them)."""
    tick, procs = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "(comm)": state, ppid, ..., utime, stime at 11, 12
        procs[int(stat.parent.name)] = (text[text.index("(") + 1:text.rindex(")")], int(fields[1]),
                                        (int(fields[11]) + int(fields[12])) / tick)
    mine, grew = {os.getpid()}, True
    while grew:  # every descendant of this process
        new = {pid for pid, (_, parent, _) in procs.items() if parent in mine} - mine
        mine, grew = mine | new, bool(new)
    return sum(cpu for pid, (comm, _, cpu) in procs.items() if pid in mine and "wandb" in comm)


def replay(run_dir: Path, sinks: list[str], repeats: int = 5) -> float:
    """The sinks' own work for one run, without the training: the run's start, every metrics row of
    ``run_dir`` and its end, through the same hook calls the runner makes. Returns the median CPU
    seconds (this process's threads plus W&B's service) per run, after one unmeasured replay."""
    import yaml

    from gptlab.plugin.hookspecs import RunInfo
    from gptlab.plugin.manager import build_plugin_system
    from gptlab.run.tracking import RunHooks

    plugins = build_plugin_system()
    config = {**yaml.safe_load((run_dir / "config.yaml").read_text()), "track": sinks}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    costs = []
    for i in range(repeats + 1):
        target = run_dir.parent.parent / f"replay_{'_'.join(sinks)}_{i}"
        target.mkdir(parents=True)
        (target / "summary.json").write_text(json.dumps(summary))
        info = RunInfo(target, config["variant"], config["seed"], config, f"replay_{'_'.join(sinks)}")
        hooks = RunHooks(plugins, info, warn=lambda message: print(f"warning: {message}"))
        cpu, service = time.process_time(), service_cpu()
        hooks("gptlab_run_start", run=info)
        for row in rows:
            if "val_loss" in row:
                evaluated = {"step": row["step"], "val_loss": row["val_loss"]}
                hooks("gptlab_eval", run=info, step=row["step"], metrics=evaluated)
            hooks("gptlab_log", run=info, step=row["step"], metrics=row)
        hooks("gptlab_run_end", run=info, summary=summary)
        if hooks.errors:
            raise SystemExit(f"a sink failed: {hooks.errors}")
        if i:
            costs.append(time.process_time() - cpu + service_cpu() - service)
    return statistics.median(costs)


def import_seconds(module: str) -> float:
    """How long ``import module`` takes in a fresh interpreter that already has torch (gptlab's case)."""
    code = f"import time, torch; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: gptlab's)")
    args = ap.parse_args()
    print(f"cores this process may use: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f}")
    print("one-time costs per process: import " + ", ".join(
        f"{label} {import_seconds(module):.2f} s" for label, module in
        (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))))
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # MLflow's artifacts go to ./mlruns
        os.environ.update(WANDB_MODE="offline", WANDB_ERROR_REPORTING="false", MLFLOW_DISABLE_TELEMETRY="true",
                          MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        os.environ.pop("WANDB_DIR", None)
        warm = {label: train(root, f"warm{i}", 20, sinks, args.threads)
                for i, (label, sinks) in enumerate(CONFIGS.items())}
        print("warm-up round of 20 steps (imports, W&B service start, new MLflow database), wall s: "
              + ", ".join(f"{label} {r['wall']:.2f}" for label, r in warm.items()))
        results: dict[str, list[dict]] = {label: [] for label in CONFIGS}
        labels = list(CONFIGS)
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in order:
                results[label].append(train(root, f"r{r}_{labels.index(label)}", args.steps, CONFIGS[label],
                                            args.threads))
        (sample,) = (root / "results" / "r0_0").glob("*/")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            work = {label: replay(sample, sinks) for label, sinks in CONFIGS.items() if sinks}
        rows_per_run = len((sample / "metrics.jsonl").read_text().splitlines())
        os.chdir(before)
    med = {label: {k: statistics.median(x[k] for x in rows) for k in ("wall", "cpu", "run", "hooks")}
           for label, rows in results.items()}
    base = med["none"]
    print(f"\n{args.steps} steps of preset nano (batch 8, a metrics row every 10 steps), {args.rounds} rounds; "
          f"medians:")
    print(f"{'sinks':<12} {'command s':>10} {'CPU s':>7} {'run s':>7} {'in hooks s':>11} {'hooks/run':>10} "
          f"{'wall overhead':>14} {'CPU overhead':>13}")
    for label, m in med.items():
        print(f"{label:<12} {m['wall']:>10.3f} {m['cpu']:>7.2f} {m['run']:>7.3f} {m['hooks']:>11.4f} "
              f"{m['hooks'] / m['run']:>9.2%} {m['wall'] / base['wall'] - 1:>+14.2%} "
              f"{m['cpu'] / base['cpu'] - 1:>+13.2%}")
    print("each round's command wall s: " + "; ".join(
        f"{label} " + " ".join(f"{x['wall']:.2f}" for x in rows) for label, rows in results.items()))
    spread = max(x["wall"] for x in results["none"]) / min(x["wall"] for x in results["none"]) - 1
    print(f"(run-to-run spread of 'none': {spread:.1%} of its wall time; overheads below that are noise)")
    print(f"\nthe sinks' own work per run, replayed without training (the same start, {rows_per_run} metrics rows "
          f"and end; CPU s of this process's threads\nand W&B's service process, median of 5), and that CPU as a "
          f"share of a run's with no sink ({base['cpu']:.2f} s):")
    print("  " + ", ".join(f"{label} {cpu:.3f} s ({cpu / base['cpu']:.2%})" for label, cpu in work.items()))


if __name__ == "__main__":
    main()
