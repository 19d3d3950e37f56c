"""Evals (``evals:``) in real runs: their metrics in metrics.jsonl, summary.json, the trackers' final
numbers and the compare table; strict names and options; a config hash that does not move for
experiments without evals; training untouched by evaluating; a resumed run equal to an uninterrupted one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptlab.config.run import config_hash
from gptlab.results.compare import higher_is_better
from gptlab.run.experiment import load_experiment
from gptlab.run.tracking import final_metrics, row_metrics
from helpers import one_line_error, pre_vs_post, run_cli, write_lab

SAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "hellaswag_sample.jsonl"
EVALS = [{"name": "hellaswag", "path": "data/hs.jsonl", "limit": 6}]


def lab(root: Path, evals=EVALS, **train) -> Path:
    """Variants a (with the base's evals) and b (evals: [] drops them), one seed, 4 steps."""
    experiment = pre_vs_post(**{"steps": 4, "batch_size": 2, "eval_every": 2, "log_every": 1, "eval_batches": 1,
                                **train})
    experiment["variants"] = {"a": {}, "b": {"evals": []}}
    experiment["plugins"] = ["stop.py"]
    if evals is not None:
        experiment["evals"] = evals
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE, root / "data" / "hs.jsonl")
    return write_lab(root, experiment, plugins={"stop.py": STOP_PLUGIN})


STOP_PLUGIN = '''
import os
import gptlab

@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    if os.environ.get("GPTLAB_TEST_STOP") == str(step):
        raise KeyboardInterrupt
'''


def run_dir(results: Path, variant: str) -> Path:
    (found,) = (results / "tiny").glob(f"{variant}__*__s0")
    return found


def rows(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "time_s")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_eval_metrics_land_in_metrics_summary_trackers_and_the_compare_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    exp = lab(tmp_path / "lab")
    results = tmp_path / "results"
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", results, "--device", "cpu")
    assert rc == 0, err
    a, b = run_dir(results, "a"), run_dir(results, "b")
    got = rows(a)
    evaluated = [r for r in got if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(set(r) >= {"hellaswag_acc", "hellaswag_acc_stderr"} for r in evaluated)
    assert not any("hellaswag_acc" in r for r in got if "val_loss" not in r)
    for r in evaluated:  # six items: the accuracy is k/6 and its standard error sqrt(p(1-p)/6)
        assert round(r["hellaswag_acc"] * 6, 9).is_integer()
        p = r["hellaswag_acc"]
        assert r["hellaswag_acc_stderr"] == pytest.approx((p * (1 - p) / 6) ** 0.5)
    summary = json.loads((a / "summary.json").read_text())
    assert summary["hellaswag_acc"] == evaluated[-1]["hellaswag_acc"]
    assert summary["eval_metrics"] == ["hellaswag_acc", "hellaswag_acc_stderr"]
    assert final_metrics(summary)["final_hellaswag_acc"] == summary["hellaswag_acc"]
    assert row_metrics(evaluated[-1])["hellaswag_acc"] == summary["hellaswag_acc"]
    # evaluating changes nothing the run trains: b (no evals, the same model) logs the same losses
    assert [r["train_loss"] for r in rows(b)] == [r["train_loss"] for r in got]
    assert "hellaswag_acc" not in json.loads((b / "summary.json").read_text())
    # the table: a column per eval metric, and --metric picks one (higher is better)
    rc, out, err = run_cli(capsys, "compare", results / "tiny", "--format", "json")
    assert rc == 0, err
    table = {row["variant"]: row for row in json.loads(out)}
    assert table["a"]["hellaswag_acc"] == summary["hellaswag_acc"] and table["b"]["hellaswag_acc"] is None
    assert table["a"]["evals.hellaswag"] == "hellaswag" and table["b"]["evals.hellaswag"] is None
    rc, out, err = run_cli(capsys, "compare", results / "tiny", "--metric", "hellaswag_acc", "--format", "json")
    assert rc == 0, err
    assert json.loads(out)[0]["hellaswag_acc_mean"] == summary["hellaswag_acc"]
    rc, out, err = run_cli(capsys, "compare", results / "tiny")
    assert rc == 0 and "hellaswag_acc" in out, out
    rc, out, err = run_cli(capsys, "show", a)
    assert rc == 0 and "hellaswag_acc" in out and "evals" in out, out


def test_accuracy_is_higher_is_better_and_losses_and_standard_errors_lower():
    assert higher_is_better("hellaswag_acc") and higher_is_better("hellaswag_acc@step4")
    assert not higher_is_better("hellaswag_acc_stderr") and not higher_is_better("val_loss")


@pytest.mark.parametrize("evals, words", [
    ([{"name": "hellaswg", "path": "data/hs.jsonl"}], ("unknown eval 'hellaswg'", "did you mean 'hellaswag'")),
    ([{"name": "hellaswag", "path": "data/hs.jsonl", "limt": 5}], ("has no option 'limt'", "did you mean 'limit'")),
    ([{"name": "hellaswag", "path": "data/hs.jsonl", "limit": 0}], ("option limit must be an integer >= 1",)),
    ([{"name": "hellaswag", "path": "data/nope.jsonl"}], ("evals.hellaswag.path 'data/nope.jsonl'", "hellaswag_val")),
    (["hellaswag"], ("evals.hellaswag", "path")),
    ([{"name": "hellaswag", "path": "data/hs.jsonl"}, "hellaswag"], ("listed twice",)),
])
@pytest.mark.parametrize("dry", [True, False])
def test_a_bad_eval_is_one_line_and_exit_2_before_anything_trains(evals, words, dry, tmp_path, capsys):
    exp = lab(tmp_path / "lab", evals)
    results = tmp_path / "results"
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", results, "--device", "cpu",
                           *(["--dry-run"] if dry else []))
    one_line_error(rc, err, *words)
    assert not (results / "tiny").exists()


def test_experiments_without_evals_keep_their_config_hash(tmp_path):
    def load(name: str, **extra) -> dict:
        experiment = {**pre_vs_post(steps=4), **extra}  # a: pre-LN, b: post-LN
        return {s.variant: s for s in load_experiment(write_lab(tmp_path / name, experiment)).runs}

    plain = load("plain")
    for spec in plain.values():
        resolved = spec.resolved()
        assert set(resolved) == {"model", "data", "train"}  # exactly what was hashed before evals existed
        assert spec.config_hash == config_hash(resolved) == config_hash({**resolved, "evals": []})
    measured = load("evals", evals=EVALS)
    assert all(measured[v].config_hash != plain[v].config_hash for v in ("a", "b"))
    assert measured["a"].resolved()["evals"] == EVALS and measured["a"].base_dir == (tmp_path / "evals").resolve()
    dropped = load("dropped", evals=EVALS, variants={"a": {}, "b": {"model": {"norm_placement": "post"}, "evals": []}})
    assert dropped["b"].config_hash == plain["b"].config_hash  # a variant's evals: [] is no evals
    assert dropped["a"].config_hash == measured["a"].config_hash


def test_a_resumed_run_logs_the_same_eval_rows_as_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    train = {"steps": 6, "checkpoint_every": 2, "log_every": 1, "eval_every": 2}
    whole, split = lab(tmp_path / "whole", **train), lab(tmp_path / "split", **train)
    rc, out, err = run_cli(capsys, "run", whole, "--results-dir", tmp_path / "whole" / "results", "--device", "cpu")
    assert rc == 0, err
    monkeypatch.setenv("GPTLAB_TEST_STOP", "5")  # stopped after step 4's state, past its eval
    rc, out, err = run_cli(capsys, "run", split, "--results-dir", tmp_path / "split" / "results", "--device", "cpu")
    assert rc != 0
    monkeypatch.delenv("GPTLAB_TEST_STOP")
    rc, out, err = run_cli(capsys, "run", split, "--results-dir", tmp_path / "split" / "results", "--device", "cpu")
    assert rc == 0, err
    resumed = run_dir(tmp_path / "split" / "results", "a")
    assert json.loads((resumed / "summary.json").read_text()).get("resumed_from") == [4]
    assert rows(resumed) == rows(run_dir(tmp_path / "whole" / "results", "a"))
    assert [r["step"] for r in rows(resumed) if "hellaswag_acc" in r] == [2, 4, 6]
