"""gptlab compare: run directories written by hand (no training), statistics checked by hand.

compare_table (the library) is checked for numbers, print_compare (the CLI) for what is printed.
"""
from __future__ import annotations

import fcntl
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gptlab.cli import build_parser
from gptlab.cli.table import print_compare
from gptlab.results.compare import compare_table
from gptlab.errors import ConfigError
from gptlab.results.frame import load_results
from gptlab.results.stats import welch_ci

from helpers import imported_modules, make_experiment, make_run, run_subprocess


def hand_welch(a: list, b: list) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% Welch interval, written out step by step."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    d = np.mean(a) - np.mean(b)
    return d, d - half, d + half


BASE = [1.00, 1.10, 1.05, 0.95]
WORSE = [1.30, 1.42, 1.36]  # clearly above BASE
NOISY = [1.00, 1.30, 0.90]  # overlaps BASE


@pytest.fixture
def exp(tmp_path):
    return make_experiment(tmp_path, "exp", {"base": BASE, "worse": WORSE, "noisy": NOISY},
                           worse={"model": {"norm_placement": "post"}},
                           noisy={"model": {"position": {"name": "rope", "base": 10000}}})


def texts(series: pd.Series) -> list[str]:
    return ["" if pd.isna(v) else str(v) for v in series]


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def row(table: pd.DataFrame, label: str) -> pd.Series:
    return table.set_index(table.columns[0]).loc[label]


def test_load_results_one_row_per_run_with_flattened_config(exp):
    df = load_results(exp)
    assert len(df) == 10
    assert list(df.columns[:6]) == ["experiment", "variant", "seed", "status", "run_dir", "config_hash"]
    assert list(dict.fromkeys(df["variant"])) == ["base", "worse", "noisy"]  # declaration order
    noisy = df[df["variant"] == "noisy"].iloc[0]
    assert noisy["model.position"] == "rope" and noisy["model.position.base"] == 10000
    assert df[df["variant"] == "base"]["model.position"].eq("learned").all()
    assert df["train.eval_lengths"].iloc[0] == "[1, 2]"
    assert df["final_val_loss"].iloc[0] == pytest.approx(1.0)
    assert load_results(exp / "base__hbase__s0")["seed"].tolist() == [0]  # a single run directory


def test_welch_interval_excludes_zero_and_is_marked(exp):
    table = compare_table(load_results(exp))
    d, lo, hi = hand_welch(WORSE, BASE)
    worse = row(table, "worse")
    assert worse["delta"] == pytest.approx(d) and lo > 0
    assert worse["delta_ci_low"] == pytest.approx(lo) and worse["delta_ci_high"] == pytest.approx(hi)
    assert worse["significant"]
    assert worse["val_loss_mean"] == pytest.approx(np.mean(WORSE))
    assert worse["val_loss_std"] == pytest.approx(np.std(WORSE, ddof=1))
    out = io.StringIO()
    print_compare([exp], file=out, width=200)
    line = next(x for x in out.getvalue().splitlines() if x.startswith("worse"))
    assert f"{d:+.4f} ± {(hi - lo) / 2:.4f} *" in line


def test_welch_edge_cases():
    assert welch_ci([1.0, 2.0], [0.5, 0.7]) == pytest.approx(hand_welch([1.0, 2.0], [0.5, 0.7]))
    d, lo, hi = welch_ci([1.0], [0.5, 0.7])  # one seed: a difference but no interval
    assert d == pytest.approx(0.4) and math.isnan(lo) and math.isnan(hi)
    assert welch_ci([2.0, 2.0], [1.0, 1.0]) == (1.0, 1.0, 1.0)  # no spread at all: the difference is exact
    assert all(math.isnan(x) for x in welch_ci([], [1.0, 2.0]))


def test_welch_interval_containing_zero_is_not_marked(exp):
    table = compare_table(load_results(exp))
    d, lo, hi = hand_welch(NOISY, BASE)
    noisy = row(table, "noisy")
    assert lo < 0 < hi
    assert (noisy["delta"], noisy["delta_ci_low"], noisy["delta_ci_high"]) == pytest.approx((d, lo, hi))
    assert not noisy["significant"]
    assert row(table, "base")["baseline"] and math.isnan(row(table, "base")["delta"])


def test_only_differing_config_keys_become_columns(exp):
    table = compare_table(load_results(exp))
    config_cols = [c for c in table.columns if c.startswith(("model.", "data.", "train."))]
    assert config_cols == ["model.position", "model.norm_placement", "model.position.base"]
    assert row(table, "worse")["model.norm_placement"] == "post"


def test_group_by_config_keys(exp):
    df = load_results(exp)
    # base and noisy share norm_placement=pre but differ in position: never pooled, split and shown
    table = compare_table(df, by="model.norm_placement")
    assert table.attrs["group_cols"] == ["model.norm_placement", "model.position", "model.position.base"]
    assert table["model.norm_placement"].tolist() == ["pre", "post", "pre"]
    assert table["model.position"].tolist() == ["learned", "learned", "rope"]
    assert table["n"].tolist() == [4, 3, 3]  # only seeds are pooled
    assert table["val_loss_mean"].tolist() == pytest.approx([np.mean(BASE), np.mean(WORSE), np.mean(NOISY)])
    assert table["delta"].iloc[1] == pytest.approx(hand_welch(WORSE, BASE)[0])
    suffix = compare_table(df, by="norm_placement")  # a unique suffix names the key
    assert suffix["model.norm_placement"].tolist() == ["pre", "post", "pre"]
    two = compare_table(df, by=["model.norm_placement", "model.position"])
    assert list(two.columns[:2]) == ["model.norm_placement", "model.position"] and len(two) == 3
    with pytest.raises(ConfigError, match="did you mean 'model.position'"):
        compare_table(df, by="model.positon")


def test_baseline_explicit_from_experiment_and_default(tmp_path, exp):
    df = load_results(exp)
    assert compare_table(df).attrs["baseline"] == "base"  # first declared variant
    table = compare_table(df, baseline="worse")
    assert row(table, "worse")["baseline"] and row(table, "base")["delta"] == pytest.approx(-hand_welch(WORSE, BASE)[0])
    with pytest.raises(ConfigError, match="did you mean 'noisy'"):
        compare_table(df, baseline="noisey")
    other = make_experiment(tmp_path / "o", "exp2", {"a": [1.0, 1.1], "b": [1.2, 1.3]}, compare={"baseline": "b"})
    assert compare_table(load_results(other)).attrs["baseline"] == "b"  # the experiment's compare block
    assert compare_table(load_results(other), baseline="a").attrs["baseline"] == "a"  # explicit wins


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_csv_and_json_read_back_the_same_numbers(exp, fmt, capsys):
    out = io.StringIO()
    (table,) = print_compare([exp], format=fmt, file=out)
    text = out.getvalue()
    notes = capsys.readouterr().err
    back = pd.read_csv(io.StringIO(text)) if fmt == "csv" else pd.read_json(io.StringIO(text), orient="records")
    assert list(back.columns) == list(table.columns)
    for col in table.columns:
        if pd.api.types.is_numeric_dtype(table[col]):
            np.testing.assert_allclose(back[col].to_numpy(float), table[col].to_numpy(float), rtol=1e-12)
        else:
            assert texts(back[col]) == texts(table[col])
    # the notes go to stderr, so the data stays parseable
    assert "mean ± std over completed runs" in notes and "mean ± std" not in text


def test_markdown_and_table_formats(exp):
    md = io.StringIO()
    print_compare([exp], format="md", file=md)
    lines = md.getvalue().splitlines()
    assert lines[0].startswith("| variant |") and "Δ vs base" in lines[0]
    assert lines[1].startswith("|---")
    assert sum(x.startswith("| ") for x in lines) == 4
    with pytest.raises(ConfigError, match="did you mean 'csv'"):
        print_compare([exp], format="cvs")


def test_failed_and_diverged_runs_are_counted_not_averaged(tmp_path):
    exp = make_experiment(tmp_path, "e", {"a": [1.0, 1.2, 1.1]})
    make_run(exp, "a", 3, None, status="failed", summary={"error": "RuntimeError: boom"})
    make_run(exp, "a", 4, 50.0, status="diverged", summary={"diverged_step": 7})
    table = compare_table(load_results(exp))
    a = table.iloc[0]
    assert (a["n"], a["n_total"], a["n_failed"], a["n_diverged"], a["n_completed"]) == (3, 5, 1, 1, 3)
    assert a["val_loss_mean"] == pytest.approx(1.1)
    out = io.StringIO()
    print_compare([exp], file=out, width=80)
    text = out.getvalue()
    assert "1 diverged, 1 failed" in flat(text) and "3/5" in text  # status survives a narrow terminal


def test_small_n_note(tmp_path, exp):
    two = make_experiment(tmp_path / "t", "two", {"a": [1.0, 1.1], "b": [1.2, 1.3]})
    out = io.StringIO()
    print_compare([two], file=out, width=100)
    assert "note: n = 2 for a, b: with 2 seeds per arm" in flat(out.getvalue())
    assert "1 time in 6" in flat(out.getvalue()) and "n = 1" not in flat(out.getvalue())
    one = make_experiment(tmp_path / "o", "one", {"a": [1.0], "b": [1.2, 1.3]})
    out = io.StringIO()
    print_compare([one], file=out, width=200)
    text = flat(out.getvalue())  # the 2-seed odds are not quoted for a single run
    assert "note: n = 1 for a: one run per row has no spread" in text and "n = 2 for b" in text
    out = io.StringIO()
    print_compare([exp], file=out, width=100)
    assert "note: n =" not in flat(out.getvalue())


def test_extrapolation_columns_with_reason_for_missing(tmp_path):
    reason = "position 'learned' cannot encode 128 tokens (trained limit 64)"
    exp = make_experiment(tmp_path, "len", {"learned": [1.0, 1.1, 1.2], "rope": [1.0, 1.1, 1.3]},
                          learned={"summary": {"val_loss@1x": 1.0, "val_loss@2x": None,
                                               "notes": {"val_loss@2x": reason}}},
                          rope={"summary": {"val_loss@1x": 1.0, "val_loss@2x": 1.5}})
    table = compare_table(load_results(exp))
    assert ["val_loss@1x", "val_loss@2x"] == [c for c in table.columns if c.startswith("val_loss@")]
    assert math.isnan(row(table, "learned")["val_loss@2x"]) and row(table, "rope")["val_loss@2x"] == 1.5
    assert reason in row(table, "learned")["notes"]
    out = io.StringIO()
    print_compare([exp], file=out, width=200)
    text = out.getvalue()
    assert "n/a¹" in text and f"¹ val_loss@2x: {reason} (learned)" in flat(text)


def test_at_step_reads_metrics_log(exp):
    table = compare_table(load_results(exp), at_step=10)
    assert row(table, "base")["val_loss@step10_mean"] == pytest.approx(np.mean(BASE) + 0.5)
    train = compare_table(load_results(exp), metric="train_loss", at_step=5)
    assert row(train, "worse")["train_loss@step5_mean"] == pytest.approx(np.mean(WORSE) + 0.4)
    with pytest.raises(ConfigError, match="logged steps: 10, 20"):
        compare_table(load_results(exp), at_step=7)


def test_plugin_logged_metric(tmp_path):
    exp = make_experiment(tmp_path, "plug", {"a": [1.0, 1.0, 1.0]})
    for seed, g in enumerate((0.5, 0.7, 0.9)):
        run = exp / f"a__ha__s{seed}"
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "train_loss": 2.0, "grad_norm": 9.0}) + "\n"
                                           + json.dumps({"step": 20, "train_loss": 1.5, "grad_norm": g}) + "\n")
    df = load_results(exp)
    assert df["grad_norm"].tolist() == [0.5, 0.7, 0.9]  # the last logged value
    assert compare_table(df, metric="grad_norm").iloc[0]["grad_norm_mean"] == pytest.approx(0.7)
    assert compare_table(df, metric="grad_norm", at_step=10).iloc[0]["grad_norm@step10_mean"] == 9.0
    with pytest.raises(ConfigError, match="did you mean 'grad_norm'"):
        compare_table(df, metric="grad_nrom")


def test_table_fits_80_columns(tmp_path):
    exp = make_experiment(tmp_path, "wide", {"a_rather_long_variant_name": [1.0, 1.1, 1.2], "b": [1.3, 1.2, 1.4]},
                          b={"model": {"activation": "swiglu", "norm_placement": "sandwich"},
                             "summary": {"val_loss@1x": 1.0, "val_loss@2x": 1.1, "mfu": 0.31}})
    out = io.StringIO()
    print_compare([exp], file=out, width=80)
    lines = out.getvalue().splitlines()
    assert max(len(x) for x in lines) <= 80
    assert any("a_rather_long_variant_name" in x for x in lines) and "hidden at width 80" in out.getvalue()


def test_interrupted_and_running_status(tmp_path):
    exp = make_experiment(tmp_path, "live", {"a": [1.0]})
    stale = make_run(exp, "a", 1, None, status="running")
    live = make_run(exp, "a", 2, None, status="running")
    (stale / ".lock").write_text("")
    with open(live / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        df = load_results(exp)
    assert df.set_index("seed")["status"].to_dict() == {0: "completed", 1: "interrupted", 2: "running"}


def test_merged_experiments_and_rerun_config_stay_apart(tmp_path):
    e1 = make_experiment(tmp_path, "one", {"a": [1.0, 1.1, 1.2]})
    e2 = make_experiment(tmp_path, "two", {"a": [2.0, 2.1, 2.2]})
    table = compare_table(load_results(tmp_path))  # a folder of experiments
    assert table[["experiment", "variant"]].values.tolist() == [["one", "a"], ["two", "a"]]
    make_run(e1, "a", 0, 3.0, chash="hother")  # same label, edited config
    labels = compare_table(load_results(e1)).iloc[:, 0].tolist()
    assert labels == ["a#ha", "a#hother"]
    assert len(load_results(e1, e1 / "a__ha__s0")) == 4  # the same run named twice counts once
    both = compare_table(load_results(e1, e2))  # the old config's label does not leak into "two"
    assert both[["experiment", "variant", "n"]].values.tolist() == [["one", "a#ha", 3], ["one", "a#hother", 1],
                                                                   ["two", "a", 3]]


def test_sort_and_user_errors(exp, tmp_path):
    df = load_results(exp)
    assert compare_table(df, sort="-val_loss")["variant"].tolist() == ["worse", "noisy", "base"]
    assert compare_table(df, sort="-tokens_per_s")["variant"].tolist() == ["base", "worse", "noisy"]
    with pytest.raises(ConfigError, match="did you mean"):
        compare_table(df, sort="tokens_per")
    with pytest.raises(ConfigError, match="does not exist"):
        load_results(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs found"):
        load_results(tmp_path / "empty")


def test_compare_command(exp, capsys, monkeypatch):
    monkeypatch.chdir(exp.parent.parent)
    args = build_parser().parse_args(["compare", "--results-dir", str(exp.parent), "--format", "csv",
                                      "--by", "norm_placement"])
    assert args.handler(args) == 0
    back = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert back["model.norm_placement"].tolist() == ["pre", "post", "pre"]  # pre splits by position
    assert back["model.position"].tolist() == ["learned", "learned", "rope"] and back["n"].tolist() == [4, 3, 3]


def test_compare_command_does_not_import_torch(exp):
    proc = run_subprocess("compare", exp, flags=("-X", "importtime"), env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].split()[:2] == ["variant", "position"]
    imported = imported_modules(proc.stderr)
    assert "gptlab.results.compare" in imported and [m for m in imported if m.split(".")[0] == "torch"] == []
