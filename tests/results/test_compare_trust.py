"""A comparison never measures runs against ones whose hidden config differs.

Run folders are written by hand (helpers.make_experiment): two experiments with different configs,
smoke runs made with overrides beside the real ones, --by over mixed configs. The rows, baselines
and differences are checked in every output format, and ``gptlab runs`` / ``gptlab clean``
against the same folders.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gptlab.cli import main
from gptlab.cli.table import print_compare
from gptlab.results.compare import compare_results, compare_table
from gptlab.errors import ConfigError
from gptlab.results.frame import load_results

from helpers import make_experiment, make_run, run_cli

PRE, POST = [2.40, 2.45, 2.38], [3.26, 3.25, 3.27]
LEARNED, ROPE = [2.20, 2.19, 2.21], [1.88, 1.87, 1.90]


def welch(a, b):
    """mean(a) - mean(b) and its 95% Welch interval, by hand."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return np.mean(a) - np.mean(b), half


@pytest.fixture
def two(tmp_path):
    """Two experiments of different depth, each with its own baseline, as after running both."""
    deep = make_experiment(tmp_path / "results", "deep", {"pre_ln": PRE, "post_ln": POST},
                           compare={"baseline": "pre_ln"},
                           pre_ln={"model": {"n_layers": 8}},
                           post_ln={"model": {"n_layers": 8, "norm_placement": "post"}})
    pos = make_experiment(tmp_path / "results", "pos", {"learned": LEARNED, "rope": ROPE},
                          compare={"baseline": "learned"}, rope={"model": {"position": "rope"}})
    return deep, pos


def test_each_experiment_gets_its_own_table_and_baseline(two):
    deep, pos = two
    tables = compare_results(deep, pos)
    assert [t.attrs["experiment"] for t in tables] == ["deep", "pos"]
    assert [t["variant"].tolist() for t in tables] == [["pre_ln", "post_ln"], ["learned", "rope"]]
    assert [t.attrs["baseline"] for t in tables] == ["pre_ln", "learned"]
    assert tables[0]["delta"].iloc[1] == pytest.approx(welch(POST, PRE)[0])
    assert tables[1]["delta"].iloc[1] == pytest.approx(welch(ROPE, LEARNED)[0])
    half = (tables[1]["delta_ci_high"] - tables[1]["delta_ci_low"]).iloc[1] / 2
    assert half == pytest.approx(welch(ROPE, LEARNED)[1])
    # the default, every experiment under the results folder, is the same two tables
    assert [t.attrs["experiment"] for t in compare_results(results_dir=deep.parent)] == ["deep", "pos"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_exports_stack_the_tables_with_their_experiment(two, fmt):
    out = io.StringIO()
    print_compare(list(two), format=fmt, file=out)
    back = pd.read_csv(io.StringIO(out.getvalue())) if fmt == "csv" else pd.read_json(io.StringIO(out.getvalue()))
    assert back.columns[0] == "experiment"
    assert back[["experiment", "variant", "baseline"]].values.tolist() == [
        ["deep", "pre_ln", True], ["deep", "post_ln", False], ["pos", "learned", True], ["pos", "rope", False]]
    assert back["delta"].iloc[1] == pytest.approx(welch(POST, PRE)[0])
    assert back["delta"].iloc[3] == pytest.approx(welch(ROPE, LEARNED)[0])


def test_table_and_markdown_print_one_titled_table_each(two):
    out = io.StringIO()
    print_compare(list(two), file=out, width=200)
    text = out.getvalue()
    assert text.index("deep") < text.index("pre_ln") < text.index("\npos") < text.index("learned")
    assert "Δ vs pre_ln" in text and "Δ vs learned" in text
    md = io.StringIO()
    print_compare(list(two), format="md", file=md)
    sections = md.getvalue().split("### ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["deep", "pos"]
    assert "| pre_ln |" in sections[0] and "| rope |" in sections[1] and "| rope |" not in sections[0]
    d, half = welch(POST, PRE)
    assert f"{d:+.4f} ± {half:.4f} *" in sections[0]


def test_merge_shows_every_key_that_differs(two):
    (table,) = compare_results(*two, merge=True)
    assert table.attrs["experiment"] is None
    assert table.attrs["group_cols"] == ["experiment", "variant"]
    # depth, placement and position all differ somewhere: each is a column, so no Δ hides a difference
    assert {"model.n_layers", "model.norm_placement", "model.position"} <= set(table.attrs["config_cols"])
    assert table["model.n_layers"].tolist() == [8, 8, 2, 2]
    assert table.attrs["baseline"] == "deep/pre_ln"
    assert table["delta"].iloc[2] == pytest.approx(welch(LEARNED, PRE)[0])


def test_by_splits_runs_whose_other_config_differs(tmp_path):
    """The README example that pooled a 64-wide baseline with 96-wide variants as if they were seeds."""
    norms = make_experiment(tmp_path, "norms", {"layernorm_pre": [2.20, 2.19, 2.21], "rmsnorm_pre": [2.22, 2.21, 2.23]},
                            layernorm_pre={"model": {"emb_dim": 64}},
                            rmsnorm_pre={"model": {"emb_dim": 64, "norm": "rmsnorm"}})
    acts = make_experiment(tmp_path, "activations", {"gelu": [2.10, 2.11, 2.09], "swiglu": [2.07, 2.06, 2.08]},
                           gelu={"model": {"emb_dim": 96}},
                           swiglu={"model": {"emb_dim": 96, "activation": "swiglu"}})
    (table,) = compare_results(norms, acts, by="model.norm,model.norm_placement", merge=True)
    # layernorm/pre runs differ in experiment, emb_dim and activation: three rows, three seeds each
    assert table.attrs["group_cols"] == ["model.norm", "model.norm_placement", "experiment", "model.emb_dim",
                                         "model.activation"]
    assert table["model.norm"].fillna("(default)").tolist() == ["(default)", "rmsnorm", "(default)", "(default)"]
    assert table[["experiment", "model.emb_dim", "model.activation", "n"]].values.tolist() == [
        ["norms", 64, "gelu", 3], ["norms", 64, "gelu", 3], ["activations", 96, "gelu", 3],
        ["activations", 96, "swiglu", 3]]
    assert table["val_loss_mean"].tolist() == pytest.approx([2.20, 2.22, 2.10, 2.07])


def test_by_that_would_need_too_many_columns_is_an_error(tmp_path, capsys):
    keys = {"n_layers": 3, "emb_dim": 48, "position": "rope", "activation": "relu", "norm": "rmsnorm",
            "norm_placement": "post", "drop_rate": 0.1}
    exp = make_experiment(tmp_path, "wide", {"a": [1.0, 1.1], "b": [1.2, 1.3]},
                          a={"model": {"qkv_bias": False}}, b={"model": {**keys, "qkv_bias": False}})
    with pytest.raises(ConfigError, match="would pool runs whose config differs in 7 other keys") as err:
        compare_table(load_results(exp), by="model.qkv_bias")
    assert "model.n_layers" in str(err.value) and "model.drop_rate" in str(err.value)
    rc, _, err = run_cli(capsys, "compare", exp, "--by", "model.qkv_bias")
    assert rc == 2 and err.count("\n") == 1


@pytest.fixture
def smoked(tmp_path):
    """An experiment whose file defines a (ha) and b (hb), plus a smoke run made with an override and
    a run of an earlier version of the file, both of variant a."""
    exp = make_experiment(tmp_path / "results", "exp", {"a": [2.0, 2.1, 2.2], "b": [2.5, 2.6, 2.4]},
                          compare={"baseline": "a"}, defined={"ha": "a", "hb": "b"})
    make_run(exp, "a", 0, 3.9, chash="hsmoke", model={"n_layers": 1},
             summary={"overrides": ["train.steps=20", "model.n_layers=1"]})
    make_run(exp, "a", 0, 2.9, chash="hold", model={"n_layers": 3})
    return exp


def test_smoke_and_outdated_runs_stay_out_of_the_table(smoked):
    (table,) = compare_results(smoked)
    assert table["variant"].tolist() == ["a", "b"] and table.attrs["hidden"] == 2
    assert table.attrs["baseline"] == "a" and table["n"].tolist() == [3, 3]
    assert table["delta"].iloc[1] == pytest.approx(welch([2.5, 2.6, 2.4], [2.0, 2.1, 2.2])[0])
    out = io.StringIO()
    print_compare([smoked], file=out, width=200)
    assert "2 run(s) not shown" in " ".join(out.getvalue().split()) and "hsmoke" not in out.getvalue()


def test_all_shows_them_marked_and_keeps_the_files_baseline(smoked):
    (table,) = compare_results(smoked, all_runs=True)
    assert table["variant"].tolist() == ["a#ha", "a#hold", "a#hsmoke", "b"]
    assert table.attrs["baseline"] == "a#ha"  # never the smoke run
    assert table["defined"].tolist() == [True, False, False, True]
    assert table["overrides"].tolist() == ["", "", "train.steps=20 model.n_layers=1", ""]
    md = io.StringIO()
    print_compare([smoked], format="md", file=md, all_runs=True)
    lines = md.getvalue().splitlines()
    assert "made with" in lines[0]
    assert "earlier version of the file" in lines[3] and "train.steps=20 model.n_layers=1" in lines[4]


def test_a_run_directory_named_on_the_command_line_is_always_shown(smoked):
    (table,) = compare_results(*sorted(smoked.glob("a__hsmoke__s0")))
    assert table["variant"].tolist() == ["a"] and table["n"].tolist() == [1]


def test_when_nothing_is_defined_the_runs_there_are_shown_marked_rather_than_an_empty_table(tmp_path):
    exp = make_experiment(tmp_path, "exp", {"a": [2.0]}, defined={"hnew": "a"})
    out = io.StringIO()
    (table,) = print_compare([exp], file=out, width=200)
    assert len(table) == 1 and table.attrs["hidden"] == 0 and not table["defined"].iloc[0]
    text = out.getvalue()
    assert "made with" in text.splitlines()[0] and "earlier version of the file" in text.splitlines()[2]


def test_narrow_terminal_keeps_the_columns_that_tell_rows_apart(tmp_path):
    exp = make_experiment(tmp_path, "warm", {"post_ln": [3.26, 3.25], "post_ln_warmup": [1.94, 1.95]},
                          post_ln={"model": {"norm_placement": "post"}},
                          post_ln_warmup={"model": {"norm_placement": "post"}})
    for run in exp.glob("post_ln_warmup__*"):  # the warmup differs in the train config
        config = json.loads((run / "config.yaml").read_text())
        config["train"]["warmup_steps"] = 250
        (run / "config.yaml").write_text(json.dumps(config))
    out = io.StringIO()
    print_compare([exp], file=out, width=80)
    text = out.getvalue()
    header = text.splitlines()[0]
    assert "warmup_steps" in header and "val_loss" in header and "Δ" in header
    assert "MFU" not in header  # n/a in every row: the first column to go
    assert "hidden at width 80: " in text and "MFU" in text.split("hidden at width 80: ")[1]


# ---------------------------------------------------------------------------------------------
# gptlab runs and gptlab clean
# ---------------------------------------------------------------------------------------------

def test_runs_lists_how_each_run_was_made(smoked, capsys):
    rc, out, _ = run_cli(capsys, "runs", smoked, "--json")
    assert rc == 0
    rows = json.loads(out)
    made = {(r["variant"], r["run_dir"].split("__")[1], r["seed"]): r["made_with"] for r in rows}
    assert made[("a", "ha", 0)] == "the file" and made[("b", "hb", 2)] == "the file"
    assert made[("a", "hsmoke", 0)] == "train.steps=20 model.n_layers=1"
    assert made[("a", "hold", 0)] == "an earlier version of the file"
    assert len(rows) == 8 and all(r["status"] == "completed" and r["age"] for r in rows)


def test_clean_removes_only_what_the_filters_name(smoked, capsys):
    before = sorted(p.name for p in smoked.iterdir() if p.is_dir())
    assert run_cli(capsys, "clean", smoked, "--overrides", "--yes")[0] == 0
    after = sorted(p.name for p in smoked.iterdir() if p.is_dir())
    assert sorted(set(before) - set(after)) == ["a__hsmoke__s0"]
    assert "a__hold__s0" in after  # outdated, but made without overrides: --overrides does not name it
    assert run_cli(capsys, "clean", smoked, "--outdated", "--variant", "a", "--yes")[0] == 0
    assert sorted(set(after) - {p.name for p in smoked.iterdir() if p.is_dir()}) == ["a__hold__s0"]
    (table,) = compare_results(smoked)
    assert table["n"].tolist() == [3, 3] and table.attrs["hidden"] == 0


def test_clean_asks_first_and_keeps_everything_on_no(smoked, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    rc, out, _ = run_cli(capsys, "clean", smoked, "--outdated")
    assert rc == 0
    assert "2 of 8 runs would be removed" in out and "nothing removed" in out
    assert len([p for p in smoked.iterdir() if p.is_dir()]) == 8


def test_clean_needs_a_filter_and_valid_values(smoked, capsys):
    for argv, message in ((["clean", str(smoked), "--yes"], "name at least one filter"),
                          (["clean", str(smoked), "--status", "running", "--yes"], "never removed"),
                          (["clean", str(smoked), "--status", "faild", "--yes"], "--status faild"),
                          (["clean", str(smoked), "--variant", "c", "--yes"], "no such variant")):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:  # argparse refuses the value itself
        main(["clean", str(smoked), "--older-than", "soon"])
    assert exit_.value.code == 2
    assert len([p for p in smoked.iterdir() if p.is_dir()]) == 8


def test_clean_by_status_and_age(tmp_path, capsys):
    exp = make_experiment(tmp_path, "exp", {"a": [2.0, 2.1]})
    failed = make_run(exp, "b", 0, None, status="failed", summary={"finished": "2020-01-01T00:00:00"})
    recent = make_run(exp, "b", 1, None, status="failed")
    assert run_cli(capsys, "clean", exp, "--status", "failed", "--older-than", "7d", "--yes")[0] == 0
    assert not failed.exists() and recent.exists()
    assert len(list(exp.glob("a__*"))) == 2  # completed runs no filter named are kept
