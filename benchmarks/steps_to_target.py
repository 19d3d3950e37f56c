"""How many steps a variant needs to reach the baseline's final validation loss, seed by seed.

    python benchmarks/steps_to_target.py results/optimizers --baseline adamw --variant muon [--variant lion]
    python benchmarks/steps_to_target.py experiments/optimizers.yaml --variant muon --variant lion

PATH is an experiment's results folder (``results/<name>``) or its YAML file (then the folder is
``--results-dir``/<name>). Runs are read with ``gptlab.results.frame.load_results``; by default only
completed runs of the configs the experiment's file defines now count (``--all``: runs made with
command-line overrides too), as in ``gptlab compare``. ``--baseline`` defaults to the experiment's
``compare.baseline``; ``--variant`` (repeatable) to every other variant.

Runs are paired by seed. For each seed the target is the baseline run's final val_loss; the steps
to reach it are the first step at which a val curve (metrics.jsonl, one point per evaluation) is at
or below it, linearly interpolated between the two evaluations around the crossing (the first
evaluation itself when that is already below). The baseline's own steps come from the same rule on
its own curve (its last step, unless the curve dipped below its final value earlier). Printed per
seed: the target, both step counts, ratio = steps_variant / steps_baseline (< 1: the variant gets
there sooner), and the paired difference of final val losses; then the mean of each over seeds with
a 95% t interval (mean ± t(0.975, n-1) · sd / sqrt(n)). A seed whose variant never reaches the
target is "not reached" and left out of the ratio's mean (said under the table).

Exit status 2, with one line on stderr, for a missing folder or file, an unknown variant or
baseline, or seeds that do not pair up.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Optional

#: t(0.975, dof) for dof 1..30, used when scipy is not installed
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class UserError(Exception):
    """A bad input: one line on stderr, exit status 2."""


def t975(dof: int) -> float:
    try:
        from scipy.special import stdtrit  # stdtrit(dof, p) == scipy.stats.t.ppf(p, dof)
        return float(stdtrit(dof, 0.975))
    except ImportError:
        return T975[dof - 1] if dof <= len(T975) else 1.960


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t interval; NaN bounds for fewer than 2 values."""
    n = len(values)
    if not n:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def val_curve(run_dir: str, metric: str = "val_loss") -> list[tuple[float, float]]:
    """(step, val_loss) of every evaluation of a run, by step."""
    from gptlab.results.frame import read_metrics

    m = read_metrics(run_dir)
    if m.empty or "step" not in m.columns or metric not in m.columns:
        return []
    m = m[["step", metric]].dropna()
    points: dict[float, float] = {}
    for step, value in zip(m["step"], m[metric]):
        if math.isfinite(float(value)):
            points[float(step)] = float(value)  # a resumed run may repeat a step: the last row wins
    return sorted(points.items())


def steps_to(curve: list[tuple[float, float]], target: float) -> Optional[float]:
    """The first step at which ``curve`` is at or below ``target``, linearly interpolated between the
    evaluation before the crossing and the one at it; None if it never gets there."""
    tol = 1e-9 * max(1.0, abs(target))
    for i, (step, value) in enumerate(curve):
        if value <= target + tol:
            if i == 0:
                return step
            s0, v0 = curve[i - 1]
            if v0 - value <= 0:
                return step
            return s0 + (v0 - target) / (v0 - value) * (step - s0)
    return None


def resolve_folder(path: Path, results_dir: Path) -> Path:
    """The experiment's results folder: ``path`` itself, or results_dir/<name> for a YAML file."""
    if not path.exists():
        raise UserError(f"{path} does not exist; pass an experiment's results folder (results/<name>) or its YAML")
    if path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise UserError(f"{path} is neither a results folder nor an experiment YAML")
        from gptlab.errors import GptlabError
        from gptlab.run.experiment import load_experiment

        try:
            name = load_experiment(path).name
        except GptlabError as exc:
            raise UserError(f"{path}: {exc}") from None
        folder = results_dir / name
        if not folder.is_dir():
            raise UserError(f"no results for {path} at {folder}; run it first (gptlab run {path}) or pass "
                            f"--results-dir")
        return folder
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    return path


def load_runs(folder: Path, all_runs: bool):
    """Completed runs of ``folder`` as a DataFrame, and its experiment.json."""
    from gptlab.errors import GptlabError
    from gptlab.results.frame import load_results
    from gptlab.run.experiment import current_definition
    from gptlab.rundir import read_experiment

    try:
        df = load_results(folder, defined_by=current_definition)
    except GptlabError as exc:
        raise UserError(str(exc)) from None
    if df["experiment"].nunique() > 1:
        raise UserError(f"{folder} holds runs of {df['experiment'].nunique()} experiments; pass one experiment's "
                        f"folder (results/<name>)")
    done = df[df["status"] == "completed"]
    hidden = 0 if all_runs else int((~done["defined"]).sum())
    if not all_runs:
        done = done[done["defined"]]
    return done, read_experiment(folder), hidden


def runs_by_seed(df, variant: str, known: list[str]) -> dict[int, object]:
    rows = df[df["variant"] == variant]
    if rows.empty:
        raise UserError(f"no completed runs of variant '{variant}' here; variants with completed runs: "
                        f"{', '.join(known) or 'none'}")
    out = {}
    for _, row in rows.iterrows():
        seed = int(row["seed"])
        if seed in out:
            raise UserError(f"variant '{variant}' has more than one completed run of seed {seed} (runs of "
                            f"different configs: drop --all, or clean them with gptlab clean)")
        out[seed] = row
    return out


def fmt(x: Optional[float], spec: str) -> str:
    return "not reached" if x is None else ("n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec))


def compare(df, baseline: str, variant: str, metric: str) -> dict:
    known = list(dict.fromkeys(df["variant"]))
    base = runs_by_seed(df, baseline, known)
    other = runs_by_seed(df, variant, known)
    seeds = sorted(set(base) & set(other))
    if not seeds:
        raise UserError(f"no seed has completed runs of both '{baseline}' (seeds {sorted(base)}) and "
                        f"'{variant}' (seeds {sorted(other)})")
    final_key = "final_val_loss" if metric == "val_loss" else metric
    rows = []
    for seed in seeds:
        b, v = base[seed], other[seed]
        b_curve, v_curve = val_curve(b["run_dir"], metric), val_curve(v["run_dir"], metric)
        for name, curve in ((baseline, b_curve), (variant, v_curve)):
            if not curve:
                raise UserError(f"run {name} seed {seed} logged no {metric}; set train.eval_every")
        target = _number(b.get(final_key), b_curve[-1][1])
        b_steps, v_steps = steps_to(b_curve, target), steps_to(v_curve, target)
        v_final = _number(v.get(final_key), v_curve[-1][1])
        rows.append({"seed": seed, "target": target, "baseline_steps": b_steps, "variant_steps": v_steps,
                     "ratio": None if v_steps is None or not b_steps else v_steps / b_steps,
                     "ratio_above": None if v_steps is not None or not b_steps else v_curve[-1][0] / b_steps,
                     "variant_final": v_final, "delta_final": v_final - target,
                     "baseline_evals": len(b_curve), "eval_spacing": _spacing(v_curve)})
    reached = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {"baseline": baseline, "variant": variant, "metric": metric, "seeds": rows,
            "ratio": dict(zip(("mean", "lo", "hi"), mean_ci(reached))), "n_reached": len(reached),
            "delta_final": dict(zip(("mean", "lo", "hi"), mean_ci([r["delta_final"] for r in rows])))}


def _number(value, fallback: float) -> float:
    """A summary number, or ``fallback`` (the curve's last point) when it is missing or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return fallback
    return value if math.isfinite(value) else fallback


def _spacing(curve: list[tuple[float, float]]) -> Optional[float]:
    gaps = sorted(b[0] - a[0] for a, b in zip(curve, curve[1:]))
    return gaps[len(gaps) // 2] if gaps else None


def _ratio(r: dict) -> str:
    if r["ratio"] is not None:
        return f"{r['ratio']:.3f}"
    return f">{r['ratio_above']:.3f}" if r.get("ratio_above") is not None else "n/a"


def print_table(res: dict) -> None:
    b, v = res["baseline"], res["variant"]
    print(f"{v} vs {b}: steps to reach {b}'s final {res['metric']} (same seed)")
    wb, wv = max(12, len(b) + 6), max(12, len(v) + 6)
    header = f"{'seed':>4}  {'target':>7}  {b + ' steps':>{wb}}  {v + ' steps':>{wv}}  {'ratio':>7}  " \
             f"{v + ' final':>{wv}}  {'Δ final':>8}"
    print(header)
    print("-" * len(header))
    for r in res["seeds"]:
        print(f"{r['seed']:>4}  {r['target']:>7.4f}  {fmt(r['baseline_steps'], '.1f'):>{wb}}  "
              f"{fmt(r['variant_steps'], '.1f'):>{wv}}  {_ratio(r):>7}  {r['variant_final']:>{wv}.4f}  "
              f"{r['delta_final']:>+8.4f}")
    n, k = len(res["seeds"]), res["n_reached"]
    ratio, delta = res["ratio"], res["delta_final"]
    ci = (lambda d, spec: f"{d['mean']:{spec}}  (95% t CI {d['lo']:{spec}} .. {d['hi']:{spec}})"
          if not math.isnan(d["lo"]) else f"{d['mean']:{spec}}  (no interval: fewer than 2 values)")
    if k:
        print(f"ratio {v}/{b}: mean {ci(ratio, '.3f')}, n = {k} seed{'s' if k != 1 else ''}")
    else:
        print(f"ratio {v}/{b}: {v} reached the target on no seed")
    if 0 < k < n:
        print(f"note: {n - k} of {n} seeds never reached the target (ratio > its last step / the baseline's); "
              f"the mean is over the other {k} only, so it flatters {v}")
    elif not k:
        print(f"(ratio > {v}'s last evaluated step / {b}'s steps on every seed)")
    print(f"Δ final {res['metric']} ({v} - {b}, paired by seed): {ci(delta, '+.4f')}, n = {n}")
    spacing = res["seeds"][0]["eval_spacing"]
    if spacing:
        print(f"(evaluations every {spacing:g} steps; crossings interpolated linearly between them)")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="steps_to_target.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="results/<experiment> or the experiment's YAML file")
    p.add_argument("--baseline", help="the variant whose final loss is the target (default: compare.baseline)")
    p.add_argument("--variant", action="append", help="variant to measure (repeatable; default: every other)")
    p.add_argument("--results-dir", type=Path, default=Path("results"), help="where a YAML's results are "
                   "(default: results)")
    p.add_argument("--metric", default="val_loss", help="the logged curve to read (default: val_loss)")
    p.add_argument("--all", action="store_true", help="also runs made with command-line overrides")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = p.parse_args(argv)
    try:
        folder = resolve_folder(args.path, args.results_dir)
        df, meta, hidden = load_runs(folder, args.all)
        known = list(dict.fromkeys(df["variant"]))
        hint = (f" ({hidden} completed run{'s' if hidden != 1 else ''} made with command-line overrides or an "
                f"earlier version of the file are left out; --all counts them)") if hidden else ""
        baseline = args.baseline or (meta.get("compare") or {}).get("baseline") or (known[0] if known else None)
        if baseline is None:
            raise UserError(f"no completed runs under {folder}")
        if baseline not in known:
            raise UserError(f"no completed runs of baseline '{baseline}' under {folder}; variants with completed "
                            f"runs: {', '.join(known) or 'none'}{hint}")
        variants = args.variant or [v for v in known if v != baseline]
        if not variants:
            raise UserError(f"no variant besides the baseline '{baseline}' under {folder}")
        for v in variants:
            if v == baseline:
                raise UserError(f"variant '{v}' is the baseline; pick another --variant or --baseline")
            if v not in known:
                raise UserError(f"no completed runs of variant '{v}' under {folder}; variants with completed runs: "
                                f"{', '.join(known)}{hint}")
        results = [compare(df, baseline, v, args.metric) for v in variants]
    except UserError as exc:
        print(f"steps_to_target: error: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "benchmarks/steps_to_target.py", *(sys.argv[1:] if argv is None else argv)])
    if args.json:
        print(json.dumps({"folder": str(folder), "command": command, "results": results}, indent=2))
        return 0
    print(f"experiment folder: {folder}")
    for res in results:
        print()
        print_table(res)
    print()
    print(f"rerun: {command}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into head and the like
        sys.stderr.close()
        sys.exit(0)
