"""Tracker 'mlflow': one MLflow run per gptlab run, in an MLflow experiment named like the gptlab one.

Where: MLFLOW_TRACKING_URI when set, else MLflow's default (MLflow 3: ``sqlite:///mlflow.db`` in the
current directory, artifacts in ./mlruns). Each run gets: params = the flattened config (model.*,
data.*, train.*); tags variant, seed, config_hash, status (running, then the run's final status) and
run_dir; every metrics.jsonl row as metrics by step; at the end the final numbers and losses at
other lengths (val_loss_at_2x, ...) at the last step, the initial gradient norms
(init_grad_norm/block_I) at step 1, and summary.json as an artifact. The MLflow status is FINISHED
for a completed run, KILLED for an interrupted one, FAILED otherwise. A resumed run continues its
MLflow run (found by the run_dir tag), first adding the metrics.jsonl rows it lacks.

MLflow's own usage telemetry is turned off unless MLFLOW_DISABLE_TELEMETRY is set.

A database write costs ~10 ms of CPU whatever it holds, so rows are written together, every
FLUSH_SECONDS at most, on one writer thread per run: a log step only appends a row to a list. The
run's end writes what is left with the final numbers and waits for the thread.
"""
import contextlib
import fcntl
import hashlib
import os
import tempfile
import time

import gptlab
from gptlab import rundir
from gptlab import Background, RunSlots, final_metrics, flat_config, grad_norms, require, row_metrics

NAME = "mlflow"
_runs = RunSlots(close=lambda found: found[0].close(timeout=5))  # (writer thread, state: client, run_id)
STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED
FLUSH_SECONDS = 5.0  # rows are written together at most this often (and at the end): one write costs ~10 ms


def mlflow_tracker():
    """MLflow: one MLflow run per gptlab run at MLFLOW_TRACKING_URI or MLflow's default (needs the mlflow extra)."""
    _no_telemetry()
    require("mlflow", "mlflow", NAME)


def _no_telemetry():
    """MLflow 3 sends usage telemetry from a thread of its own: a sink sends the run and nothing else
    (MLFLOW_DISABLE_TELEMETRY=false, set by you, keeps it on). Set before mlflow is imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@gptlab.hookimpl
def gptlab_register(register):
    register("tracker", NAME, mlflow_tracker)


@gptlab.hookimpl
def gptlab_run_start(run):
    if not run.tracks(NAME):
        return
    _runs.close_stale()  # a run of this process whose sink was switched off before its end
    state = {"rows": [], "flushed": time.time()}  # rows not yet handed to the writer, and when it last got some
    writer = Background(f"gptlab-mlflow-{run.seed}")
    kept = list(rundir.metric_rows(run.dir)) if run.resumed_from is not None else []  # before new rows arrive
    writer.submit(_start, state, run, kept)
    _runs.put(run, (writer, state))


@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    found = _runs.get(run)
    if found is not None:
        writer, state = found
        now = time.time()
        state["rows"].append((step, row_metrics(metrics), int(now * 1000)))
        if now - state["flushed"] >= FLUSH_SECONDS:
            writer.submit(_log, state, state["rows"])
            state["rows"], state["flushed"] = [], now


@gptlab.hookimpl
def gptlab_run_end(run, summary):
    found = _runs.pop(run)
    if found is not None:
        writer, state = found
        writer.submit(_end, state, run, dict(summary), state["rows"], int(time.time() * 1000))
        writer.close()


# -- on the writer thread --------------------------------------------------------------------
def _start(state, run, kept):
    _no_telemetry()  # (a --jobs worker or a launcher's task never ran the tracker's check)
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    with _first_use(mlflow.get_tracking_uri()):
        client = MlflowClient()
        experiment = _experiment_id(client, run.experiment)
    run_dir = str(run.dir.resolve())
    run_id = _earlier_attempt(client, experiment, run_dir) if run.resumed_from is not None else None
    if run_id is None:
        tags = {"variant": run.name, "seed": str(run.seed), "config_hash": str(run.config.get("config_hash")),
                "status": "running", "run_dir": run_dir}
        run_id = client.create_run(experiment, run_name=f"{run.name}/{run.seed}", tags=tags).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flat_config(run.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])
        done = 0
    else:  # a resumed run continues its MLflow run
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "status", "running")
        done = max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)
    state.update(client=client, run_id=run_id)
    now = int(time.time() * 1000)  # a resumed run's rows that a kill kept from MLflow (kept is [] otherwise)
    _log(state, [(row["step"], row_metrics(row), now) for row in kept
                 if isinstance(row.get("step"), int) and row["step"] > done])


@contextlib.contextmanager
def _first_use(uri):
    """One process at a time opens a SQLite store: MLflow creates or upgrades the database on first
    use, and two --jobs workers doing that at once break its schema. A lock file in the temp folder,
    named by the URI, serialises them (a database that is ready costs one lock round)."""
    if not uri.startswith("sqlite:"):
        yield
        return
    name = hashlib.sha256(f"{os.getcwd()}|{uri}".encode()).hexdigest()[:16]
    fd = os.open(os.path.join(tempfile.gettempdir(), f"gptlab-mlflow-{name}.lock"),
                 os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _experiment_id(client, name):
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another process (--jobs) created it a moment ago
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise RuntimeError(f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore "
                           f"--experiment-id {found.experiment_id}) or remove it for good (mlflow gc)")
    return found.experiment_id


def _earlier_attempt(client, experiment, run_dir):
    if "'" in run_dir:
        return None
    runs = client.search_runs([experiment], filter_string=f"tags.run_dir = '{run_dir}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log(state, rows, extra=(), tags=()):
    from mlflow.entities import Metric

    metrics = [Metric(k, v, timestamp, step) for step, values, timestamp in rows for k, v in values.items()]
    metrics += list(extra)
    for i in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
        if metrics[i:i + 1000] or tags:
            state["client"].log_batch(state["run_id"], metrics=metrics[i:i + 1000], tags=list(tags) if not i else [])


def _end(state, run, summary, rows, timestamp):
    from mlflow.entities import Metric, RunTag

    client, run_id = state["client"], state["run_id"]
    last = summary.get("step") or 0
    finals = [Metric(k, v, timestamp, last) for k, v in final_metrics(summary).items()]
    finals += [Metric(k, v, timestamp, 1) for k, v in grad_norms(summary).items()]
    _log(state, rows, finals, [RunTag("status", str(summary.get("status")))])  # the last rows too: one write
    summary_file = run.dir / "summary.json"
    if summary_file.is_file():
        client.log_artifact(run_id, str(summary_file))
    client.set_terminated(run_id, status=STATUS.get(summary.get("status"), "FAILED"))
