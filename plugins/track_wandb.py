"""Tracker 'wandb': one Weights & Biases run per gptlab run.

Project = experiment name, group = variant, run name = VARIANT/SEED; the resolved config as the W&B
config; every metrics.jsonl row by step; the final numbers, the losses at other lengths and the
initial gradient norms in the W&B summary. Files go to RUN_DIR/wandb/ unless WANDB_DIR is set.

Mode: WANDB_MODE when set; otherwise online only when an API key is configured (WANDB_API_KEY or a
netrc entry for the W&B host, as ``wandb login`` writes), else offline. So gptlab never prompts for
a login, and an offline run says once, at its end, which ``wandb sync`` command uploads it; offline,
W&B's error reporting is off too unless WANDB_ERROR_REPORTING is set. W&B's
own console capture is off (gptlab's output stays gptlab's), and so is its requirements.txt (it
costs ~0.15 s of CPU per run; summary.json records the versions; WANDB_X_SAVE_REQUIREMENTS=true
brings it back). Starting W&B and every call after it
run on one writer thread per run, so a log step only queues a row; the run's end waits for it.
"""
import multiprocessing
import netrc
import os
import sys
from urllib.parse import urlparse

import gptlab
from gptlab import rundir
from gptlab import Background, RunSlots, final_metrics, grad_norms, number, require, row_metrics

NAME = "wandb"
_runs = RunSlots(close=lambda found: _finish(found))  # (writer thread, state filled by the thread: the Run)


def wandb_tracker():
    """Weights & Biases: one W&B run per gptlab run, offline unless logged in (needs the wandb extra)."""
    require("wandb", "wandb", NAME)


@gptlab.hookimpl
def gptlab_register(register):
    register("tracker", NAME, wandb_tracker)


def _mode():
    """None (W&B reads WANDB_MODE itself), "online" with a configured API key, else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found else "offline"


def _previous_id(folder):
    """The W&B run id of this run's newest earlier attempt (its ``*-run-DATE-ID`` folder), if any."""
    attempts = sorted(folder.glob("*-run-*-*")) if folder.is_dir() else []
    return attempts[-1].name.rsplit("-", 1)[-1] if attempts else None


@gptlab.hookimpl
def gptlab_run_start(run):
    if not run.tracks(NAME):
        return
    _runs.close_stale()
    own_dir = not os.environ.get("WANDB_DIR")
    folder = run.dir / "wandb"
    kwargs = {}
    if own_dir:
        rundir.refuse_link(folder)
        kwargs["dir"] = str(run.dir)
    if _mode():
        kwargs["mode"] = _mode()
    if (kwargs.get("mode") or os.environ.get("WANDB_MODE")) in ("offline", "dryrun", "disabled"):
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # offline means nothing leaves the machine
    if run.resumed_from is not None and own_dir and _previous_id(folder):
        kwargs.update(id=_previous_id(folder), resume="allow")  # the same W&B run continues
    config = {key: value for key, value in run.config.items() if key not in ("changes", "track")}
    # a --jobs worker trains one run and exits: it stops the W&B service it started at the run's end
    # (not one it found through WANDB_SERVICE); the main process keeps it for its next run
    state = {"stop_service": multiprocessing.parent_process() is not None and not os.environ.get("WANDB_SERVICE")}
    writer = Background(f"gptlab-wandb-{run.seed}")  # starting W&B's service takes ~0.5 s: not on the loop
    writer.submit(_start, state, project=run.experiment, group=run.name, name=f"{run.name}/{run.seed}",
                  config=config, **kwargs)
    _runs.put(run, (writer, state))


@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    found = _runs.get(run)
    if found is not None:
        writer, state = found
        # commit: the row is complete, and W&B would otherwise let it overwrite the summary at the end
        writer.submit(lambda values: state["run"].log(values, step=step, commit=True), row_metrics(metrics))


@gptlab.hookimpl
def gptlab_run_end(run, summary):
    found = _runs.pop(run)
    if found is None:
        return
    writer, state = found
    numbers = {**final_metrics(summary), **grad_norms(summary)}
    best = number(summary.get("best_val_step"))
    if best is not None:
        numbers["best_val_step"] = int(best)
    numbers.update(status=summary.get("status"), config_hash=run.config.get("config_hash"))
    writer.submit(_end, state, numbers, 0 if summary.get("status") == "completed" else 1)
    try:
        writer.close()
    finally:
        if state["stop_service"]:
            import wandb

            wandb.teardown()
    if state.get("note"):
        sys.stderr.write(state["note"] + "\n")


# -- on the writer thread --------------------------------------------------------------------
def _start(state, **kwargs):
    import wandb

    quiet = dict(console="off", silent=True, disable_git=True, save_code=False)
    if "WANDB_X_SAVE_REQUIREMENTS" not in os.environ:
        quiet["x_save_requirements"] = False  # listing every installed package: ~0.15 s of CPU per run
    state["run"] = wandb.init(reinit="create_new", settings=wandb.Settings(**quiet), **kwargs)


def _end(state, numbers, exit_code):
    handle = state["run"]
    state["note"] = _where(handle)
    try:
        handle.summary.update(numbers)
    finally:
        handle.finish(exit_code=exit_code)


def _where(handle):
    """One line per run: where an offline run lies and how to upload it, or an online run's page."""
    try:
        if handle.offline:
            return f"wandb: offline run saved in {handle.sync_dir}; upload it with `wandb sync {handle.sync_dir}`"
        return f"wandb: run synced to {handle.url}" if handle.url else None
    except Exception:  # a message must never count as the sink failing
        return None


def _finish(found):
    """Finish a run of this process whose sink was switched off before its end."""
    writer, state = found
    try:
        writer.close(timeout=5)
    finally:
        if state.get("run") is not None:
            state["run"].finish(exit_code=1)
