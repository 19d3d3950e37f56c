"""The runner owns the run: typed outcomes, one reading of the experiment file, one plan, and a
command line (--track, --allow-large) merged into the experiment as it is loaded, never after.

Every run is tiny (preset nano, one layer, context 32, 8 steps of batch 4) and trains in this
process, through ``ExperimentRunner`` or ``gptlab.cli.main``.
"""
from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest

from gptlab.config.run import config_hash
from gptlab.run.experiment import load_experiment
from gptlab.run.runner import ExperimentRunner, PlannedRun, RunOutcome

from helpers import run_cli, write_lab

STEPS = 8
EXP = {
    "name": "outcomes",
    "model": {"preset": "nano", "n_layers": 1, "context_length": 32, "drop_rate": 0.0},
    "train": {"steps": STEPS, "batch_size": 4, "log_every": 2, "eval_every": STEPS, "eval_batches": 1,
              "checkpoint_every": 2},
    "variants": {"a": {}, "b": {"model": {"norm_placement": "post"}}},
    "seeds": [0],
}
#: a tracker that writes, into each run it is chosen for, the tracks the run was given
PROBE = '''
import json
import gptlab


@gptlab.hookimpl
def gptlab_register(register):
    register("tracker", "probe", lambda: None)


@gptlab.hookimpl
def gptlab_run_start(run):
    if run.tracks("probe"):
        (run.dir / "probe.json").write_text(json.dumps(run.config["track"]))
'''


def write_exp(root: Path, **changes) -> Path:
    return write_lab(root, {**EXP, **changes})


def runner_of(path: Path, **kwargs) -> ExperimentRunner:
    return ExperimentRunner.open(path, results_dir=path.parent / "results", device="cpu", **kwargs)


def test_run_returns_a_typed_outcome_per_run_run_then_skip_then_resume(tmp_path):
    path = write_exp(tmp_path)

    runner = runner_of(path)
    plan = runner.prepare()
    assert all(isinstance(p, PlannedRun) for p in plan) and [p.action for p in plan] == ["run", "run"]
    first = runner.run()
    assert [type(o) for o in first] == [RunOutcome, RunOutcome] and [o.action for o in first] == ["run", "run"]
    for planned, outcome in zip(plan, first):
        assert outcome.spec == planned.spec and outcome.run_dir == planned.run_dir and outcome.exists
        assert outcome.status == "completed" and outcome.traceback is None
        assert outcome.summary == json.loads((outcome.run_dir / "summary.json").read_text())

    again = runner_of(path).run()  # a rerun keeps the finished runs, as they were
    assert [o.action for o in again] == ["skip", "skip"]
    assert [o.summary for o in again] == [o.summary for o in first]
    assert [o.run_dir for o in again] == [o.run_dir for o in first]

    # stop run 'b' (redone with --force) at step 4: it is interrupted, with a resumable state there
    stop = [False]

    def on_progress(spec, state, row):
        stop[0] = spec.variant == "b" and row["step"] >= 4

    forced = runner_of(path, force=True, should_stop=lambda: stop[0])
    assert [p.action for p in forced.prepare()] == ["redo", "redo"]
    with pytest.raises(KeyboardInterrupt):
        forced.run(on_progress=on_progress)
    resumed = runner_of(path)
    assert [p.action for p in resumed.prepare()] == ["skip", "resume"]
    outcomes = resumed.run()
    assert [o.action for o in outcomes] == ["skip", "resume"]
    assert outcomes[1].status == "completed" and outcomes[1].summary["resumed_from"] == [4]


def test_a_failed_run_names_its_traceback(tmp_path, monkeypatch):
    """A run that crashes is a result: failed, with its error.txt named in its outcome."""
    import gptlab.run.runner as runner_module

    real = runner_module.train_run

    def crash_b(spec, *args, **kwargs):
        if spec.variant == "b":
            raise ValueError("bad batch")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", crash_b)
    outcomes = runner_of(write_exp(tmp_path)).run()
    assert [(o.action, o.status) for o in outcomes] == [("run", "completed"), ("run", "failed")]
    assert outcomes[0].traceback is None
    assert outcomes[1].traceback == outcomes[1].run_dir / "error.txt"
    assert "bad batch" in outcomes[1].traceback.read_text()


def _opens_of(path: Path, monkeypatch) -> list:
    """Every open of ``path`` from now on, however it is opened (open, io.open, os.open)."""
    target = os.path.realpath(path)
    seen = []

    def counting(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) == target:
                seen.append(file)
            return real(file, *args, **kwargs)
        return opener

    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(io, "open", counting(io.open))
    monkeypatch.setattr(os, "open", counting(os.open))
    return seen


def test_gptlab_run_reads_the_experiment_file_once(tmp_path, capsys, monkeypatch):
    """The file is read once per command: loading it, the second pass for what it defines without
    the command line's train.steps, and the final table's check of that definition included."""
    path = write_exp(tmp_path)
    opens = _opens_of(path, monkeypatch)
    rc, out, err = run_cli(capsys, "run", path, "train.steps=4", "--results-dir", tmp_path / "results",
                           "--device", "cpu")
    assert rc == 0, err
    assert len(opens) == 1, opens
    assert "Δ vs a" in out  # the final table, whose check of the file's definition reused the reading
    meta = json.loads((tmp_path / "results" / "outcomes" / "experiment.json").read_text())
    plain = load_experiment(path)
    assert set(meta["defined"]) == set(plain.defined) == {config_hash(s.resolved()) for s in plain.runs}
    trained = {json.loads(p.read_text())["config_hash"] for p in (tmp_path / "results").glob("outcomes/*/summary.json")}
    assert trained.isdisjoint(meta["defined"])  # the runs made with train.steps=4 are not the file's own

    opens.clear()  # the next command reads the file again: it may have changed
    rc, out, err = run_cli(capsys, "run", path, "train.steps=4", "--results-dir", tmp_path / "results",
                           "--device", "cpu", "--dry-run")
    assert rc == 0 and len(opens) == 1, (err, opens)


def test_the_plan_is_made_once_per_command(tmp_path, capsys, monkeypatch):
    made = []
    real = ExperimentRunner.make_plan
    monkeypatch.setattr(ExperimentRunner, "make_plan", lambda self: made.append(self) or real(self))
    path = write_exp(tmp_path)
    for extra in ([], [], ["--dry-run"]):  # a first run, a rerun that keeps every run, a dry run
        made.clear()
        rc, out, err = run_cli(capsys, "run", path, "--results-dir", tmp_path / "results", "--device", "cpu", *extra)
        assert rc == 0, err
        assert len(made) == 1


def test_track_reaches_the_runs_and_the_experiment_is_never_changed(tmp_path, capsys, monkeypatch):
    import gptlab.run.runner as runner_module

    (tmp_path / "probe.py").write_text(PROBE)
    path = write_exp(tmp_path, plugins=["probe.py"], seeds=[0])
    loaded = []
    real = runner_module.load_experiment
    monkeypatch.setattr(runner_module, "load_experiment", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    rc, out, err = run_cli(capsys, "run", path, "--results-dir", tmp_path / "results", "--device", "cpu",
                           "--track", "probe", "--allow-large")
    assert rc == 0, err
    (exp,) = loaded
    assert exp.track == ["probe"] and exp.allow_large
    written = sorted((tmp_path / "results" / "outcomes").glob("*/probe.json"))
    assert len(written) == 2 and all(json.loads(p.read_text()) == ["probe"] for p in written)
    for field, value in (("track", []), ("allow_large", False), ("runs", [])):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(exp, field, value)
    assert exp.track == ["probe"] and exp.allow_large and len(exp.runs) == 2

    # the loader merges the command line's tracks after the file's (and its track= override), once each
    plain = load_experiment(path)
    assert plain.track == [] and not plain.allow_large
    assert load_experiment(path, ["track=[probe]"], track=["probe,tensorboard"]).track == ["probe", "tensorboard"]


def test_executors_share_one_job_type(tmp_path):
    """--jobs workers and launcher tasks build the same Job: the experiment reduced to its run."""
    from gptlab.run.workers import Job

    path = write_exp(tmp_path)
    runner = runner_of(path, force=True)
    plan = runner.prepare(write=False)
    job = Job.of(runner, plan[1], "cpu", 1)
    assert job.exp.runs == [plan[1].spec] and job.index == 1 and job.force and not job.restart
    assert job.exp.name == runner.exp.name and job.results_dir == runner.results_dir and job.threads == 1
    assert runner.exp.runs == [p.spec for p in plan]  # the runner's own experiment is left whole
