"""Tracker 'tensorboard': each run's curves, final numbers and config as TensorBoard event files in
RUN_DIR/tensorboard/, so ``tensorboard --logdir results/EXPERIMENT`` shows every run of an experiment.

Scalars use the metrics.jsonl names (train_loss, val_loss, lr, tokens_per_s, tokens) at their step;
at the run's end the losses at other lengths (val_loss_at_2x, ...) are added at the last step, the
gradient norm of each block at initialisation (init_grad_norm/block_I) at step 1, and the config as
hparams with the final numbers (hparam/final_val_loss, ...) for the HParams dashboard. A resumed run
rewrites its files from metrics.jsonl, then goes on. TensorBoard writes from its own thread; a log
step only queues a few scalars.
"""
import gptlab
from gptlab import rundir
from gptlab import RunSlots, final_metrics, flat_config, grad_norms, require, row_metrics

NAME = "tensorboard"
FOLDER = "tensorboard"
_writers = RunSlots(close=lambda writer: writer.close())  # the SummaryWriter of the run in flight


def tensorboard_tracker():
    """TensorBoard event files in each run's tensorboard/ folder (needs the tensorboard extra)."""
    require("torch.utils.tensorboard", "tensorboard", NAME)


@gptlab.hookimpl
def gptlab_register(register):
    register("tracker", NAME, tensorboard_tracker)


@gptlab.hookimpl
def gptlab_run_start(run):
    if not run.tracks(NAME):
        return
    from torch.utils.tensorboard import SummaryWriter

    _writers.close_stale()  # a run of this process whose sink was switched off before its end
    folder = run.dir / FOLDER
    rundir.refuse_link(folder)
    # an earlier attempt's files go: redone, its curves are another run's; resumed, they may lack the
    # last events (a kill), so the rows metrics.jsonl kept up to the resumable state are written anew
    for old in folder.glob("events.out.tfevents.*"):
        if old.is_file() and not old.is_symlink():
            old.unlink()
    writer = _writers.put(run, SummaryWriter(str(folder), flush_secs=30))
    if run.resumed_from is not None:
        for row in rundir.metric_rows(run.dir):
            for key, value in row_metrics(row).items():
                writer.add_scalar(key, value, row.get("step"))


@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    writer = _writers.get(run)
    if writer is not None:
        for key, value in row_metrics(metrics).items():
            writer.add_scalar(key, value, step)


@gptlab.hookimpl
def gptlab_run_end(run, summary):
    writer = _writers.pop(run)
    if writer is None:
        return
    try:
        from torch.utils.tensorboard.summary import hparams

        last = summary.get("step") or 0
        for key, value in grad_norms(summary).items():
            writer.add_scalar(key, value, 1)
        finals = final_metrics(summary)
        for key, value in finals.items():
            if key.startswith("val_loss_at_"):
                writer.add_scalar(key, value, last)
        params = {**flat_config(run.config), "variant": run.name, "seed": run.seed,
                  "config_hash": str(run.config.get("config_hash")), "status": str(summary.get("status"))}
        scores = {f"hparam/{key}": value for key, value in finals.items()}
        # written into this run's own event file (SummaryWriter.add_hparams would make a sub-run)
        experiment, start, end = hparams(params, scores)
        file_writer = writer._get_file_writer()
        for event in (experiment, start, end):
            file_writer.add_summary(event)
        for key, value in scores.items():
            writer.add_scalar(key, value, last)
    finally:
        writer.close()
