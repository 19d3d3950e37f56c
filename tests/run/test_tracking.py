"""Tracking sinks: TensorBoard, W&B (offline) and MLflow (SQLite) write what the run wrote, read back
with each tool's own reader; choosing sinks, missing packages and failing sinks.

One tiny experiment (1 layer, 12 steps, 2 seeds) trains once in this process for all three sinks;
the other tests train a single run or none. No network: W&B runs offline, MLflow uses a SQLite file.
"""
from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import run_cli, run_subprocess, write_lab

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside MLflow

# the three optional extras; CI installs them (.ci/run), so a missing one fails here instead of skipping
for _extra in ("tensorboard", "wandb", "mlflow"):
    importlib.import_module(_extra)

EXP = {
    "name": "trk",
    "model": {"preset": "nano", "n_layers": 1, "context_length": 32, "position": "rope"},
    "train": {"steps": 12, "batch_size": 4, "log_every": 3, "eval_every": 6, "eval_batches": 1,
              "eval_lengths": [2]},
    "seeds": [0, 1],
}
ROW_KEYS = ("train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "tokens", "flops", "time_s")


def write_exp(folder: Path, **changes) -> Path:
    return write_lab(folder, {**EXP, **changes})


def run_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p for p in exp_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One experiment trained in this process with all three sinks: track: in the YAML plus --track."""
    root = tmp_path_factory.mktemp("tracked")
    exp = write_exp(root, track=["tensorboard", "mlflow"])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's artifacts land in ./mlruns
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("WANDB_DIR", raising=False)
        mp.delenv("WANDB_SERVICE", raising=False)  # W&B sets it for its service: gone again after this
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("COLUMNS", "200")
        rc, out, err = run_cli(None, "run", exp, "--results-dir", root / "results", "--device", "cpu",
                               "--track", "wandb")
    assert rc == 0, err
    runs = run_dirs(root / "results" / "trk")
    assert len(runs) == 2 and all(summary(r)["status"] == "completed" for r in runs)
    return {"root": root, "runs": runs, "uri": uri, "err": err}


# -- TensorBoard -------------------------------------------------------------------------------
def test_tensorboard_event_files_hold_the_run(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for run_dir in tracked["runs"]:
        rows, s = metrics(run_dir), summary(run_dir)
        acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        for key in ROW_KEYS:
            got = [(e.step, e.value) for e in acc.Scalars(key)]
            want = curve(rows, key)
            assert [step for step, _ in got] == [step for step, _ in want], key
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key  # float32 on disk
        last = rows[-1]["step"]
        assert [(e.step, e.value) for e in acc.Scalars("val_loss_at_2x")] == \
            [(last, pytest.approx(s["val_loss@2x"], rel=1e-6))]
        norms = s["init_grad_norms"]
        assert len(norms) == 1 and [(e.step, e.value) for e in acc.Scalars("init_grad_norm/block_0")] == \
            [(1, pytest.approx(norms[0], rel=1e-6))]
        assert acc.Scalars("hparam/final_val_loss")[-1].value == pytest.approx(s["final_val_loss"], rel=1e-6)
        # the config as hparams, in this run's own event file
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        assert hp["model.emb_dim"].number_value == 64 and hp["model.position"].string_value == "rope"
        assert hp["train.steps"].number_value == 12 and hp["seed"].number_value == s["seed"]
        assert hp["config_hash"].string_value == s["config_hash"] and hp["status"].string_value == "completed"


# -- MLflow ------------------------------------------------------------------------------------
def test_mlflow_runs_hold_params_metrics_tags_and_the_summary(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    experiment = client.get_experiment_by_name("trk")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 2  # one MLflow run per gptlab run
    by_dir = {r.data.tags["run_dir"]: r for r in found}
    for run_dir in tracked["runs"]:
        rows, s = metrics(run_dir), summary(run_dir)
        run = by_dir[str(run_dir.resolve())]
        assert run.info.status == "FINISHED" and run.info.run_name == f"base/{s['seed']}"
        tags = run.data.tags
        assert (tags["variant"], tags["seed"], tags["config_hash"], tags["status"]) == \
            (s["variant"], str(s["seed"]), s["config_hash"], "completed")
        params = run.data.params
        assert params["model.emb_dim"] == "64" and params["train.steps"] == "12" and params["model.position"] == "rope"
        assert params["train.eval_lengths"] == "[2]" and params["train.min_lr"] == "null"
        for key in ROW_KEYS:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert history == curve(rows, key), key  # doubles: exact
        assert run.data.metrics["val_loss_at_2x"] == s["val_loss@2x"]
        assert run.data.metrics["final_val_loss"] == s["final_val_loss"]
        assert run.data.metrics["init_grad_norm/block_0"] == s["init_grad_norms"][0]
        assert run.data.metrics["mean_tokens_per_s"] == s["tokens_per_s"]
        local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
        saved = json.loads(local.read_text())
        timing = ("hook_seconds", "hook_errors")  # the end hooks' own time is added after they ran
        assert {k: v for k, v in saved.items() if k not in timing} == {k: v for k, v in s.items() if k not in timing}


# -- W&B ---------------------------------------------------------------------------------------
def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's LevelDB-style log (32 KiB blocks of CRC, length, type,
    data after a 7-byte ':W&B' header), each record a wandb.proto Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending += chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            out.append(pb.Record.FromString(pending))
            pending = b""
        elif kind == 2:  # the first piece
            pending = chunk
    return out


def test_wandb_offline_runs_hold_config_history_and_summary(tracked):
    for run_dir in tracked["runs"]:
        rows, s = metrics(run_dir), summary(run_dir)
        (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))
        (log,) = offline.glob("*.wandb")
        records = wandb_records(log)
        kinds = [r.WhichOneof("record_type") for r in records]
        assert "exit" in kinds  # wandb.finish() ran
        (run,) = [r.run for r in records if r.HasField("run")]
        assert (run.project, run.run_group, run.display_name) == ("trk", "base", f"base/{s['seed']}")
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["model"]["emb_dim"] == 64 and config["train"]["steps"] == 12
        assert config["config_hash"] == s["config_hash"] and config["seed"] == s["seed"]
        history = {}
        final = {}
        for r in records:
            if r.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif r.HasField("summary"):
                final.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        want = {r["step"]: {k: r[k] for k in ROW_KEYS if r.get(k) is not None} for r in rows}
        assert history == want  # JSON numbers: the very floats of metrics.jsonl
        assert final["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-12)
        assert final["val_loss_at_2x"] == pytest.approx(s["val_loss@2x"], rel=1e-12)
        assert final["mean_tokens_per_s"] == pytest.approx(s["tokens_per_s"], rel=1e-12)
        assert final["tokens_per_s"] == rows[-1]["tokens_per_s"]  # W&B's summary of a curve: its last value
        assert final["init_grad_norm/block_0"] == pytest.approx(s["init_grad_norms"][0], rel=1e-12)
        assert final["status"] == "completed"
        # the sync command, once per run
        assert tracked["err"].count(f"upload it with `wandb sync {offline}`") == 1


def test_every_run_records_its_hook_time_and_no_error(tracked):
    for run_dir in tracked["runs"]:
        s = summary(run_dir)
        assert set(s["hook_seconds"]) == {"track_tensorboard", "track_wandb", "track_mlflow"}
        assert "hook_errors" not in s and "warning" not in tracked["err"]


# -- choosing sinks ----------------------------------------------------------------------------
def test_track_is_not_part_of_the_config_hash():
    from gptlab.run.experiment import load_experiment

    plain = load_experiment(None, cfg=OmegaConf.create(EXP))
    doc = OmegaConf.create({**EXP, "track": ["tensorboard", "mlflow"]})
    tracked = load_experiment(None, ["track=[wandb]"], cfg=doc)
    assert tracked.track == ["wandb"]  # an override replaces the list
    assert [s.config_hash for s in tracked.runs] == [s.config_hash for s in plain.runs]
    assert load_experiment(None, cfg=OmegaConf.create({**EXP, "track": "tensorboard, mlflow"})).track == \
        ["tensorboard", "mlflow"]


@pytest.mark.parametrize("how", ["yaml", "flag"])
def test_an_unknown_tracker_is_a_one_line_error(capsys, tmp_path, how):
    exp = write_exp(tmp_path, **({"track": ["tensorbord"]} if how == "yaml" else {}))
    extra = ["--track", "mlflow,tensorbord"] if how == "flag" else []
    for dry in ([], ["--dry-run"]):
        rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "results", "--device", "cpu",
                               *extra, *dry)
        assert rc == 2
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "unknown tracker 'tensorbord'" in err and "did you mean 'tensorboard'" in err
        assert "mlflow, tensorboard, wandb" in err
        assert not (tmp_path / "results").exists()


def test_a_bad_track_value_is_a_one_line_error(capsys, tmp_path):
    exp = write_exp(tmp_path, track=[{"name": "wandb"}])
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "results", "--dry-run")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'track' must list tracker names" in err


def test_a_missing_package_stops_before_anything_is_created(tmp_path, capsys, monkeypatch):
    """mlflow's import blocked (a sitecustomize in a real subprocess): exit 2 naming the extra, no run dir."""
    exp = write_exp(tmp_path / "lab")
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None  # as if not installed\n")
    proc = run_subprocess("run", "exp.yaml", "--track", "mlflow", "--device", "cpu", cwd=tmp_path / "lab",
                          env={"PYTHONPATH": str(block)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "tracker 'mlflow' needs the mlflow package" in proc.stderr and 'gptlab[mlflow]' in proc.stderr
    assert not (tmp_path / "lab" / "results").exists()
    # the same under --dry-run (in this process: the import blocked the same way)
    monkeypatch.setitem(sys.modules, "wandb", None)
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "results", "--dry-run", "--track", "wandb")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and 'gptlab[wandb]' in err
    assert not (tmp_path / "results").exists()


# -- failing sinks -----------------------------------------------------------------------------
BROKEN = '''
    """A sink that breaks at step 6, and an observer that breaks at the end."""
    import json

    import gptlab


    def broken():
        """Breaks at step 6."""


    def _note(run, event):
        with open(run.dir / "calls.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\\n")


    @gptlab.hookimpl
    def gptlab_register(register):
        register("tracker", "broken", broken)


    @gptlab.hookimpl
    def gptlab_run_start(run):
        _note(run, "start")


    @gptlab.hookimpl
    def gptlab_log(run, step, metrics):
        _note(run, step)
        if step == 6:
            raise RuntimeError("disk on fire")


    @gptlab.hookimpl
    def gptlab_run_end(run, summary):
        _note(run, "end")
'''
OBSERVER = '''
    import gptlab


    @gptlab.hookimpl
    def gptlab_run_end(run, summary):
        raise ValueError("cannot say goodbye")
'''


def test_a_failing_sink_is_reported_once_and_the_run_completes(capsys, tmp_path):
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "broken_sink.py").write_text(textwrap.dedent(BROKEN))
    (plugins / "observer.py").write_text(textwrap.dedent(OBSERVER))
    exp = write_exp(tmp_path, seeds=[0], track=["broken", "tensorboard"])
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "results", "--device", "cpu",
                           "--plugins-dir", plugins)
    assert rc == 0, err
    (run_dir,) = run_dirs(tmp_path / "results" / "trk")
    s = summary(run_dir)
    assert s["status"] == "completed" and s["step"] == 12
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert "tracker 'broken' (plugin broken_sink) failed in gptlab_log at step 6 (RuntimeError: disk on fire)" in err
    assert "switched off for the rest of this run" in warnings[0]
    assert "plugin 'observer' failed in gptlab_run_end (ValueError: cannot say goodbye)" in err
    assert s["hook_errors"] == {"broken_sink": "gptlab_log at step 6: RuntimeError: disk on fire",
                                "observer": "gptlab_run_end: ValueError: cannot say goodbye"}
    calls = [json.loads(line) for line in (run_dir / "calls.jsonl").read_text().splitlines()]
    assert calls == ["start", 3, 6]  # switched off after the failure: no more calls, no end
    assert not (run_dir / "error.txt").exists()
    # the other sink saw the whole run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [r["step"] for r in metrics(run_dir)]


def test_a_tracker_not_chosen_is_never_called(capsys, tmp_path):
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "broken_sink.py").write_text(textwrap.dedent(BROKEN))
    exp = write_exp(tmp_path, seeds=[0], train={**EXP["train"], "steps": 3})
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "results", "--device", "cpu",
                           "--plugins-dir", plugins)
    assert rc == 0, err
    (run_dir,) = run_dirs(tmp_path / "results" / "trk")
    assert not (run_dir / "calls.jsonl").exists() and not (run_dir / "tensorboard").exists()
    assert "hook_seconds" not in summary(run_dir)


STOPPER = '''
    import gptlab


    @gptlab.hookimpl
    def gptlab_log(run, step, metrics):
        if step == 9 and not (run.dir / "stopped").exists():  # Ctrl-C, once
            (run.dir / "stopped").write_text("")
            raise KeyboardInterrupt
'''


def test_a_resumed_run_continues_its_records(tracked, capsys, tmp_path, monkeypatch):
    """Stopped at step 9 (resumable from step 6), then resumed: one MLflow run, every step once."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "stopper.py").write_text(textwrap.dedent(STOPPER))
    exp = write_exp(tmp_path, name="trk_resume", seeds=[0], track=["tensorboard", "mlflow"],
                    train={**EXP["train"], "checkpoint_every": 3})
    monkeypatch.chdir(tracked["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])  # a database that exists: no creation to wait for
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    argv = ("run", exp, "--results-dir", tmp_path / "results", "--device", "cpu", "--plugins-dir", plugins)
    assert run_cli(capsys, *argv)[0] == 130
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    (run_dir,) = run_dirs(tmp_path / "results" / "trk_resume")
    rows, s = metrics(run_dir), summary(run_dir)
    assert s["resumed_from"] == [6] and [r["step"] for r in rows] == [3, 6, 9, 12]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train_loss")] == \
        [(step, pytest.approx(v, rel=1e-6)) for step, v in curve(rows, "train_loss")]
    client = MlflowClient(tracking_uri=tracked["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("trk_resume").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    for key in ("train_loss", "val_loss"):
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == curve(rows, key)


# -- worker processes ----------------------------------------------------------------------------
def test_sinks_work_in_jobs_workers(tmp_path):
    """--jobs 2: each spawned worker rebuilds the plugin system, reports its own run and stops W&B's service."""
    exp = write_exp(tmp_path / "lab", track=["tensorboard", "wandb"])
    env = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_DIR": None,
           "WANDB_SERVICE": None}  # its own W&B service per worker, not this process's
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", "--jobs", "2", "--threads", "1", cwd=exp.parent,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = run_dirs(exp.parent / "results" / "trk")
    assert len(runs) == 2
    for run_dir in runs:
        rows = metrics(run_dir)
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("train_loss")] == \
            [(step, pytest.approx(v, rel=1e-6)) for step, v in curve(rows, "train_loss")]
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        kinds = [r.WhichOneof("record_type") for r in wandb_records(next(offline.glob("*.wandb")))]
        assert "exit" in kinds and kinds.count("history") == len(rows)
        assert proc.stderr.count(f"wandb sync {offline.relative_to(exp.parent)}`") == 1


RACE = """
import sys
from gptlab.builtin_plugins import track_mlflow
from mlflow.tracking import MlflowClient

with track_mlflow._first_use(sys.argv[1]):
    client = MlflowClient(sys.argv[1])
    print(track_mlflow._experiment_id(client, "race"))
"""


def test_mlflow_workers_create_a_new_database_one_at_a_time(tmp_path):
    """Two --jobs workers opening a new SQLite store at once: MLflow's schema creation would collide."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [proc.communicate(timeout=120) + (proc.returncode,) for proc in procs]
    assert all(rc == 0 for _, _, rc in results), [err for _, err, _ in results]
    assert len({out.strip() for out, _, _ in results}) == 1  # the same experiment, created once
