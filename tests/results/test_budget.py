"""Comparisons at equal compute (``gptlab compare --at flops=|tokens=|time=``), the seeds a difference
needs, the thread count runs trained with, and the cost every metrics row records. Curves are
written by hand where the numbers must be exact; one real run checks what training records."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gptlab.results.compare import Z_80, Z_975, compare_table, seeds_needed
from gptlab.results.frame import load_results
from gptlab.rundir import CONFIG, EXPERIMENT, METRICS, SUMMARY

FPT = 10.0  # FLOPs per token of every hand-made run


def run(exp: Path, variant: str, seed: int, curve: list[tuple[int, float]], *, flops: bool = True,
        threads: int = 2) -> None:
    """A completed run whose val curve is ``curve`` [(tokens, val_loss)], one evaluation per point,
    1 second of training per 100 tokens."""
    folder = exp / f"{variant}__h{variant}__s{seed}"
    folder.mkdir(parents=True)
    meta = {"experiment": exp.name, "variant": variant, "seed": seed, "config_hash": f"h{variant}"}
    (folder / CONFIG).write_text(json.dumps({**meta, "model": {"n_layers": 2}, "data": {}, "train": {"steps": 3}}))
    last = curve[-1][1]
    (folder / SUMMARY).write_text(json.dumps({**meta, "status": "completed", "final_val_loss": last,
                                              "best_val_loss": last, "flops_per_token": FPT, "threads": threads}))
    rows = [{"step": i + 1, "tokens": t, "train_loss": v + 0.1, "val_loss": v, "time_s": t / 100,
             **({"flops": t * FPT} if flops else {})} for i, (t, v) in enumerate(curve)]
    (folder / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def experiment(root: Path, arms: dict, **kw) -> Path:
    exp = root / "budget"
    exp.mkdir(parents=True)
    (exp / EXPERIMENT).write_text(json.dumps({"name": "budget", "variants": list(arms), "compare": {}}))
    for variant, curves in arms.items():
        for seed, curve in enumerate(curves):
            run(exp, variant, seed, curve, **kw.get(variant, {}))
    return exp


CURVE = [(100, 3.0), (200, 2.0), (300, 1.5)]


@pytest.mark.parametrize("at, want", [(("tokens", 150), 2.5), (("flops", 2500), 1.75), (("time", 2.0), 2.0),
                                      (("tokens", 100), 3.0), (("tokens", 300), 1.5)])
def test_a_curve_is_read_linearly_between_the_evaluations_around_the_budget(tmp_path, at, want):
    exp = experiment(tmp_path, {"a": [CURVE], "b": [[(t, v - 0.5) for t, v in CURVE]]})
    table = compare_table(load_results(exp), at=at)
    assert table["val_loss@{}={:g}_mean".format(*at)].tolist() == pytest.approx([want, want - 0.5])
    assert table["delta"].iloc[1] == pytest.approx(-0.5)


@pytest.mark.parametrize("budget, why", [(50, "the budget comes before its first evaluation"),
                                         (301, "the budget is past its last evaluation")])
def test_never_extrapolated_and_a_row_says_how_many_seeds_reach_the_budget(tmp_path, budget, why):
    short = [(100, 3.1), (200, 2.1)]
    exp = experiment(tmp_path, {"a": [CURVE, CURVE], "b": [CURVE, short]})
    table = compare_table(load_results(exp), at=("tokens", budget))
    assert table["n"].tolist() == [0, 0]
    assert f"0 of 2 completed seeds reach this budget (2: {why})" in table["notes"].iloc[0]
    table = compare_table(load_results(exp), at=("tokens", 250))  # b's short seed ends at 200
    assert table["n"].tolist() == [2, 1]
    assert table["val_loss@tokens=250_mean"].tolist() == pytest.approx([1.75, 1.75])
    assert table["notes"].iloc[1] == ("val_loss@tokens=250: 1 of 2 completed seeds reach this budget "
                                      "(1: the budget is past its last evaluation)")
    assert table["notes"].iloc[0] == ""


def test_runs_made_before_rows_carried_flops_are_read_from_tokens_and_flops_per_token(tmp_path):
    exp = experiment(tmp_path, {"old": [CURVE]}, old={"flops": False})
    table = compare_table(load_results(exp), at=("flops", 1500))
    assert table["val_loss@flops=1500_mean"].iloc[0] == pytest.approx(2.5)


def test_seeds_needed_is_the_closed_form():
    vals, base = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])  # pooled sd 1, difference -1
    assert seeds_needed(vals, base, -1.0) == math.ceil(2 * (Z_975 + Z_80) ** 2) == 16
    assert math.isnan(seeds_needed(vals[:1], base, -1.0)) and math.isnan(seeds_needed(vals, base, 0.0))


def test_the_table_notes_the_seeds_needed_and_mixed_thread_counts(tmp_path):
    exp = experiment(tmp_path, {"a": [[(100, 2.0)], [(100, 3.0)], [(100, 4.0)]],
                                "b": [[(100, 1.0)], [(100, 2.0)], [(100, 3.0)]]}, b={"threads": 1})
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run([sys.executable, "-m", "gptlab", "compare", str(exp), "--seeds-needed"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "b: not distinguishable from a at 95% (n = 3 vs 3; 16 seeds per arm resolve a difference this size)" \
        in out.stdout
    header, _, base_row, b_row = out.stdout.splitlines()[:4]
    column = header.index("seeds needed") + len("seeds needed")  # right-aligned under its header
    assert b_row[:column].split()[-1] == "16" and base_row[:column].split()[-1] == "baseline"
    exp2 = experiment(tmp_path / "mixed", {"a": [CURVE, CURVE]}, a={"threads": 2})
    (exp2 / "a__ha__s1" / SUMMARY).write_text((exp2 / "a__ha__s1" / SUMMARY).read_text().replace('"threads": 2',
                                                                                                   '"threads": 4'))
    table = compare_table(load_results(exp2))
    assert "threads: its runs trained with 2 and 4 CPU threads" in table["notes"].iloc[0]


@pytest.mark.parametrize("args, message", [
    (["--at", "flop=3"], "--at 'flop=3': unknown budget (did you mean 'flops'?)"),
    (["--at", "tokens=-1"], "--at 'tokens=-1': the budget must be a finite number > 0"),
    (["--at", "tokens=lots"], "--at 'tokens=lots': 'lots' is not a number"),
    (["--at", "tokens=100", "--at-step", "1"], "--at and --at-step both pick where to read the metric"),
])
def test_bad_budgets_are_one_line_errors(tmp_path, args, message):
    exp = experiment(tmp_path, {"a": [CURVE]})
    out = subprocess.run([sys.executable, "-m", "gptlab", "compare", str(exp), *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr


def test_compare_takes_the_experiment_file_and_training_records_its_cost(tmp_path):
    exp = {"name": "cost", "model": {"preset": "nano", "n_layers": 2, "emb_dim": 32, "n_heads": 4},
           "train": {"steps": 8, "batch_size": 4, "eval_every": 4, "eval_batches": 1, "log_every": 2}, "seeds": [0]}
    (tmp_path / "cost.yaml").write_text(yaml.safe_dump(exp))
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "gptlab", "run", "cost.yaml", "--device", "cpu", "--threads", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "cost").glob("*__s0")
    summary = json.loads((run_dir / SUMMARY).read_text())
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    assert summary["threads"] == 1
    assert [r["flops"] for r in rows] == [r["tokens"] * summary["flops_per_token"] for r in rows]
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and times[-1] == pytest.approx(summary["train_time_s"])
    halfway = rows[1]["flops"]  # the evaluation at step 4
    out = subprocess.run([sys.executable, "-m", "gptlab", "compare", "cost.yaml", "--at", f"flops={halfway}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{rows[1]['val_loss']:.4f}" in out.stdout and f"val_loss@flops={halfway:g}" in out.stdout


def test_curves_can_be_drawn_against_tokens_flops_or_training_time(tmp_path):
    from gptlab.results.plots import experiment_panels, run_panels
    from gptlab.results.report import plot_spec, run_curves

    exp = experiment(tmp_path, {"a": [CURVE, CURVE]})
    run_dir = exp / "a__ha__s0"
    assert dict((n, (xs, ys)) for n, xs, ys in run_panels(run_dir, "flops")[0][1])["val"] == \
        ([1000.0, 2000.0, 3000.0], [3.0, 2.0, 1.5])
    assert run_panels(run_dir, "time")[0][1][1][1] == [1.0, 2.0, 3.0]
    (val_panel, _) = experiment_panels(load_results(exp), "tokens")
    assert val_panel[1] == [("a (n=2)", [100.0, 200.0, 300.0], [3.0, 2.0, 1.5])]
    spec = plot_spec(run_curves(load_results(exp)))
    assert spec["x"]["flops"][0] == [1000.0, 2000.0, 3000.0] and spec["x"]["time"][0] == [1.0, 2.0, 3.0]
    env = dict(os.environ, COLUMNS="100")
    shown = subprocess.run([sys.executable, "-m", "gptlab", "show", str(exp), "--x", "time"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "(training time (s))" in shown.stdout
    page = tmp_path / "r.html"
    made = subprocess.run([sys.executable, "-m", "gptlab", "report", str(exp), "--html", str(page)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert 'value="flops" data-title="training FLOPs"' in page.read_text()
