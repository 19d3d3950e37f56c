"""Damaged or tampered resumable states are refused; sinks cannot end a run; planted links are not followed.

Issue 20, part A. A run is stopped deterministically (a plugin raises KeyboardInterrupt in its log
hook at step 12, after the states of steps 5 and 10 were saved), one state is tampered with, and the
run is started again. A state is used only when its step is within the run, its counters are
present, of the right types and consistent with metrics.jsonl, and its tensors fit the model;
otherwise it is skipped with one warning naming it, and the run ends exactly as the uninterrupted
run (or, when no state is usable, a clean run) ends: the same metrics rows, weights and summary.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptlab.rundir as rd
from gptlab.train import resume
from gptlab.train.loop import TrainState

from helpers import run_cli, tree_hash, write_lab
from test_resume import EXPERIMENT as LONG
from test_resume import assert_same_run, run_dir

EXPERIMENT = {**LONG, "plugins": ["stopper.py"],
              "model": {**LONG["model"], "n_layers": 1, "context_length": 16, "emb_dim": 32, "n_heads": 2},
              "train": {**LONG["train"], "steps": 20, "batch_size": 2, "warmup_steps": 2}}
# stops the run (as Ctrl-C would) at the first log step at or after STOP_AT, when that is set
STOPPER = '''
import os
import gptlab

@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    if step >= int(os.environ.get("GPTLAB_TEST_STOP_AT", "1000000")):
        raise KeyboardInterrupt
'''


def lab(path: Path) -> Path:
    return write_lab(path, EXPERIMENT, plugins={"stopper.py": STOPPER}).parent


def run(capsys, monkeypatch, root: Path, stop_at: int | None = None) -> tuple[int, str, str]:
    monkeypatch.chdir(root)
    if stop_at is None:
        monkeypatch.delenv("GPTLAB_TEST_STOP_AT", raising=False)
    else:
        monkeypatch.setenv("GPTLAB_TEST_STOP_AT", str(stop_at))
    return run_cli(capsys, "run", "exp.yaml", "--device", "cpu")


def summary(root: Path) -> dict:
    return json.loads((run_dir(root) / rd.SUMMARY).read_text())


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(uninterrupted run, run stopped at step 12 with the states of steps 5 and 10)."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("made")
    reference, stopped = lab(base / "reference"), lab(base / "stopped")
    try:
        mp.chdir(reference)
        assert run_cli(None, "run", "exp.yaml", "--device", "cpu")[0] == 0
        mp.chdir(stopped)
        mp.setenv("GPTLAB_TEST_STOP_AT", "12")
        assert run_cli(None, "run", "exp.yaml", "--device", "cpu")[0] == 130
    finally:
        mp.undo()
    assert resume.states(run_dir(stopped)) == [5, 10]
    return reference, stopped


@pytest.fixture
def stopped(made, tmp_path) -> Path:
    root = tmp_path / "lab"
    shutil.copytree(made[1], root, symlinks=True)
    return root


def state_dir(root: Path, step: int) -> Path:
    return run_dir(root) / rd.RESUME / f"step_{step:08d}"


def edit_state(root: Path, step: int, change) -> None:
    path = state_dir(root, step) / "state.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def rehash(root: Path, step: int) -> None:
    """Record the current tensor files' sha256 in the state: a tampering that also fixes the hashes."""
    edit_state(root, step, lambda info: info["sha256"].update(
        {name: rd.file_sha256(state_dir(root, step) / name) for name in info["sha256"]}))


def test_the_untouched_states_resume_and_equal_the_uninterrupted_run(made, stopped, capsys, monkeypatch):
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    assert warnings(err) == []
    assert summary(stopped)["resumed_from"] == [10]
    assert_same_run(made[0], stopped)


def _pop(key):
    return lambda info: info["loop"]["state"].pop(key)


TAMPERED = {
    "step beyond the run": (lambda info: info.update(step=99999), "its step 99999 is not the 10"),
    "loop counters missing": (lambda info: info.pop("loop"), "the loop's counters (loop.state) are missing"),
    "one counter missing": (_pop("tokens"), "the loop's counters lack tokens"),
    "metrics_rows a string": (lambda info: info.update(metrics_rows="4"), "metrics_rows '4' is not a row count"),
    "metrics_rows a float": (lambda info: info.update(metrics_rows=4.0), "metrics_rows 4.0 is not a row count"),
    "metrics_rows negative": (lambda info: info.update(metrics_rows=-2), "metrics_rows -2 is not a row count"),
    "metrics_rows beyond the file": (lambda info: info.update(metrics_rows=40), "it saw 40 rows of metrics.jsonl"),
    "metrics_rows too few": (lambda info: info.update(metrics_rows=1), "row 2 of metrics.jsonl was logged at or before"),
    "metrics_rows too many": (lambda info: info.update(metrics_rows=5),
                              "row 5 of metrics.jsonl is not a row logged at or before step 10"),
    "tokens disagree": (lambda info: info["loop"]["state"].update(tokens=7), "loop.state.tokens 7 is not 10 steps"),
    "counter of the wrong type": (lambda info: info["loop"]["state"].update(best_val="low"),
                                  "loop.state.best_val 'low' is not null or a finite number"),
    "loss_sum not a number": (lambda info: info["loop"].update(loss_sum=None), "loop.loss_sum None"),
    "loss_count negative": (lambda info: info["loop"].update(loss_count=-1), "loop.loss_count -1"),
    "wall time missing": (lambda info: info.pop("wall_time_s"), "wall_time_s None"),
    "unknown format": (lambda info: info.update(format=2), "unknown format 2"),
    "sha256 not a mapping": (lambda info: info.update(sha256=["x"]), "sha256 is not a digest"),
    "state.json a list": (lambda info: info.clear(), "unknown format None"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_newest_state_is_skipped_naming_it_and_the_one_before_is_used(made, stopped, capsys,
                                                                                 monkeypatch, case):
    change, reason = TAMPERED[case]
    edit_state(stopped, 10, change)
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    (warning,) = warnings(err)
    assert str(state_dir(stopped, 10).relative_to(stopped)) in warning and "damaged resumable state ignored" in warning
    assert reason in warning, warning
    assert summary(stopped)["resumed_from"] == [5]
    assert_same_run(made[0], stopped)


def test_a_state_claiming_a_step_beyond_the_run_is_never_used(made, stopped, capsys, monkeypatch):
    """The issue's case: a state named and recorded as step 99999 of a 20-step run."""
    final = run_dir(stopped) / rd.RESUME / "step_00099999"
    state_dir(stopped, 10).rename(final)
    edit_state(stopped, 99999, lambda info: (info.update(step=99999), info["loop"]["state"].update(step=99999)))
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    (warning,) = warnings(err)
    assert "step_00099999" in warning and "step 99999 is beyond this run's 20 steps" in warning
    assert summary(stopped)["resumed_from"] == [5]
    assert_same_run(made[0], stopped)


def test_when_no_state_is_usable_the_run_ends_as_a_clean_run_would(made, stopped, capsys, monkeypatch):
    edit_state(stopped, 10, lambda info: info.update(metrics_rows=-1))
    edit_state(stopped, 5, lambda info: info["loop"].pop("state"))
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    assert len(warnings(err)) == 2 and all("damaged resumable state ignored" in w for w in warnings(err))
    assert "resumed_from" not in summary(stopped)
    assert_same_run(made[0], stopped)


def test_tensors_that_do_not_fit_the_model_are_refused_even_with_matching_hashes(made, stopped, capsys,
                                                                                  monkeypatch):
    train = state_dir(stopped, 10) / "train.safetensors"
    tensors = load_file(train)
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(train))
    rehash(stopped, 10)
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    (warning,) = warnings(err)
    assert f"train.safetensors holds {key} of shape [3, 3]" in warning
    assert summary(stopped)["resumed_from"] == [5]
    assert_same_run(made[0], stopped)


def test_weights_of_another_model_are_refused_even_with_matching_hashes(made, stopped, capsys, monkeypatch):
    weights = state_dir(stopped, 10) / "model.safetensors"
    tensors = load_file(weights)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(weights))
    rehash(stopped, 10)
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    (warning,) = warnings(err)
    assert "model.safetensors holds extra.weight, which this model does not have" in warning
    assert_same_run(made[0], stopped)


@pytest.mark.parametrize("name", ["state.json", "model.safetensors", "train.safetensors"])
def test_a_state_file_linked_to_dev_zero_is_refused_not_read(made, stopped, capsys, monkeypatch, name):
    path = state_dir(stopped, 10) / name
    path.unlink()
    path.symlink_to("/dev/zero")
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 0, err
    (warning,) = warnings(err)
    assert name in warning and "is not a regular file" in warning
    assert summary(stopped)["resumed_from"] == [5]
    assert_same_run(made[0], stopped)


def test_a_planted_resume_link_is_refused_in_one_line_and_nothing_outside_changes(stopped, tmp_path, capsys,
                                                                                    monkeypatch):
    outside = tmp_path / "elsewhere"
    shutil.copytree(run_dir(stopped) / rd.RESUME, outside)
    shutil.rmtree(run_dir(stopped) / rd.RESUME)
    (run_dir(stopped) / rd.RESUME).symlink_to(outside)
    before = tree_hash(outside), tree_hash(run_dir(stopped))
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert str((run_dir(stopped) / rd.RESUME).relative_to(stopped)) in line and "symbolic link gptlab did not create" in line
    assert (tree_hash(outside), tree_hash(run_dir(stopped))) == before


def test_a_planted_step_link_is_refused_in_one_line_and_its_target_is_untouched(stopped, tmp_path, capsys,
                                                                                 monkeypatch):
    outside = tmp_path / "elsewhere"
    shutil.copytree(state_dir(stopped, 10), outside)
    (run_dir(stopped) / rd.RESUME / "step_00000015").symlink_to(outside)
    before = tree_hash(outside), tree_hash(run_dir(stopped))
    rc, out, err = run(capsys, monkeypatch, stopped)
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert "step_00000015 is a symbolic link gptlab did not create" in line
    assert (tree_hash(outside), tree_hash(run_dir(stopped))) == before


def test_the_counters_checked_are_exactly_the_training_loops_counters():
    from dataclasses import fields

    assert set(resume.COUNTERS) == {f.name for f in fields(TrainState)}


# -- sinks: anything short of Ctrl-C switches the sink off, never the run -----------------------------
EXITING_SINK = '''
import sys
import gptlab

@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    if step >= 6:
        sys.exit(3)
'''


@pytest.mark.parametrize("raise_line, shown", [("sys.exit(3)", "SystemExit: 3"),
                                               ("raise GeneratorExit('bye')", "GeneratorExit: bye")])
def test_a_sink_raising_system_exit_is_switched_off_and_the_run_completes(made, tmp_path, capsys, monkeypatch,
                                                                        raise_line, shown):
    root = lab(tmp_path / "lab")
    (root / "stopper.py").write_text(EXITING_SINK.replace("sys.exit(3)", raise_line))
    rc, out, err = run(capsys, monkeypatch, root)
    assert rc == 0, err
    (warning,) = warnings(err)
    assert "stopper" in warning and f"failed in gptlab_log at step 6 ({shown})" in warning
    assert "switched off for the rest of this run" in warning
    result = summary(root)
    assert result["status"] == "completed"
    assert result["hook_errors"] == {"stopper": f"gptlab_log at step 6: {shown}"}
    assert_same_run(made[0], root)


# -- the launcher's view of metrics.jsonl is bounded ----------------------------------------------------
def test_the_launchers_metrics_tail_skips_an_over_long_line_and_never_follows_a_link(tmp_path):
    from gptlab.run.launch import _MetricsTail

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n' + b"x" * (rd.MAX_METRICS_LINE + 10))
    tail = _MetricsTail(path)
    assert [r["step"] for r in tail.rows()] == [1]
    tail.CHUNK = rd.MAX_METRICS_LINE + 1  # smaller looks than the line: it is skipped across looks
    assert tail.rows() == []
    with open(path, "ab") as fh:
        fh.write(b'x\n{"step": 2}\n')
    seen = []
    for _ in range(3):
        seen += [r["step"] for r in tail.rows()]
    assert seen == [2]
    link = tmp_path / "linked.jsonl"
    link.symlink_to(path)
    assert _MetricsTail(link).rows() == []
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    assert _MetricsTail(zero).rows() == []
