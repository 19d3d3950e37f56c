"""Pending runs as the tasks of one job array, through submitit (``gptlab run --launcher slurm|local``).

Each task trains one run exactly as a ``--jobs`` worker does (``workers.run_job`` on a
``workers.Job``): the same run directory, lock, skip and resume rules, so results/ looks the
same whichever machine trained a run. ``local`` sends the same tasks through submitit's local
executor (subprocesses on this machine), which is how this path is tested without a cluster.

submitit keeps its pickles and logs in ``results/<experiment>/.submitit/``; ``jobs.json`` there
records which job each run was submitted as, so ``gptlab status`` can list runs that are still
queued and have no run directory yet. submitit is an optional extra: ``check_launcher`` says what to
install before anything is read or written.

Stops: shortly before a time limit (and on a preemption, where the cluster sends it) Slurm gives
the task submitit's signal (USR2). The task then finishes its step, saves a resumable state,
marks the run interrupted, and hands over to submitit, which calls ``RunTask.checkpoint`` and
requeues the task; the requeued task finds the state and resumes. SIGTERM (scancel, or a
preemption that Slurm requeues by itself) stops the run the same way without a requeue of ours:
it resumes when the task or ``gptlab run`` comes back to it.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .. import rundir as rd
from ..errors import ConfigError
from ..config.run import SlurmConfig
from .workers import Job, Progress, run_job

try:  # the optional extra; without it ``check_launcher`` stops the command before a task is made
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:
    _Checkpointable = object

SUBMITIT = ".submitit"  #: submitit's folder inside results/<experiment>/
JOBS = "jobs.json"  #: inside it: every submission, which run went to which job
INSTALL = 'pip install -e ".[slurm]"'
#: without --time a local run gets a week: the local executor would otherwise stop it after 2 minutes
LOCAL_TIME_MIN = 7 * 24 * 60
#: job states after which a job will not train again: Slurm's (sacct spelling; CANCELLED may carry " by UID";
#: PREEMPTED is not one, Slurm may requeue it) and the local executor's, as _job_states names them
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "FINISHED", "ENDED")
QUEUED = "queued"  #: submitted, not started yet
REQUEUED = "requeued"  #: interrupted, and its job will resume it


def check_launcher(launcher: str) -> None:
    """Refuse a launcher that cannot work here, before the command reads or writes anything."""
    if launcher == "inprocess":
        return
    try:
        importlib.import_module("submitit")
    except ImportError:
        raise ConfigError(f"--launcher {launcher} needs submitit, which is not installed; install it with "
                          f"{INSTALL}") from None
    if launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise ConfigError(f"--launcher slurm: Slurm is not available on this machine ({' and '.join(missing)} "
                              f"not on PATH); run from a Slurm login node, or use --launcher local to run the same "
                              f"tasks here")


def check_device_name(name: str) -> None:
    """--device for tasks that land on other machines: only its spelling can be checked here."""
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None


def slurm_settings(file: SlurmConfig, flags: dict, launcher: str) -> SlurmConfig:
    """The experiment file's ``slurm:`` section with the command-line flags that were given over it."""
    merged = SlurmConfig(**{**dataclasses.asdict(file), **{k: v for k, v in flags.items() if v is not None}})
    merged.validate()
    if launcher == "slurm" and merged.time is None:  # submitit's default would be 5 minutes
        raise ConfigError("--launcher slurm needs a time limit per run: pass --time MINUTES, or set slurm.time in "
                          "the experiment file")
    return merged


def executor_parameters(cfg: SlurmConfig, launcher: str, name: str, threads: Optional[int],
                        device_type: str = "cpu") -> dict:
    """submitit's ``update_parameters`` for one task per run: the shared keys and the Slurm-only
    ones (``slurm_*``, which the local executor ignores)."""
    gpus = cfg.gpus_per_run
    if gpus is None and launcher == "local" and device_type == "cuda":  # the local executor hides GPUs not asked for
        gpus = 1
    params = {"name": f"gptlab-{name}", "timeout_min": cfg.time or LOCAL_TIME_MIN, "mem_gb": cfg.mem,
              "gpus_per_node": gpus, "cpus_per_task": threads if launcher == "slurm" else None,
              "slurm_partition": cfg.partition, "slurm_array_parallelism": cfg.array_parallelism}
    return {k: v for k, v in params.items() if v is not None}


def _requeue_signal() -> signal.Signals:
    """The signal submitit asks Slurm for before a time limit (its SUBMITIT_PREEMPT_SIGNAL, USR2 by default)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def task_threads(launcher: str, requested: Optional[int], tasks: int, device_type: str) -> Optional[int]:
    """CPU threads per task: on Slurm ``--threads`` (None: the cores Slurm gives each task); the local
    executor starts every task at once, so on CPU they share this machine's cores."""
    if launcher == "slurm":
        return requested
    from ..train.devices import cpu_threads

    return cpu_threads(requested, max(1, tasks)) if device_type == "cpu" else None


class RunTask(_Checkpointable):
    """One run as one task of the array: trains it as a ``--jobs`` worker does (``run_job``) and,
    when the scheduler is about to stop it, saves where it is and lets submitit requeue it."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same run again, which resumes from the state just saved.
        --force and --restart were meant for the first attempt; a second would throw that state away."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(RunTask(dataclasses.replace(self.job, force=False, restart=False)))

    def __call__(self) -> Any:
        """Train the run; returns its RunOutcome (what submitit keeps as the task's result)."""
        job = self.job
        if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):  # Slurm requeued the task by itself
            job = dataclasses.replace(job, force=False, restart=False)
        requeue_signal = _requeue_signal()
        submitit_handler = signal.getsignal(requeue_signal)
        stops = {"any": 0, "requeue": 0, "ctrl-c": 0}

        def on_signal(signum: int, frame: Any) -> None:
            stops["any"] += 1
            stops["requeue"] += signum == requeue_signal
            stops["ctrl-c"] += signum == signal.SIGINT
            if stops["ctrl-c"] > 1:  # Ctrl-C twice: stop now (the run resumes from its last saved state)
                raise KeyboardInterrupt

        def requeue() -> None:
            if stops["requeue"] and callable(submitit_handler):
                signal.signal(requeue_signal, submitit_handler)
                submitit_handler(requeue_signal, None)  # checkpoint(), requeue and exit; raises if it will not

        for sig in (signal.SIGINT, signal.SIGTERM, requeue_signal):
            signal.signal(sig, on_signal)
        # planned in the task, not at submission: a requeued task resumes, a run finished meanwhile is skipped
        return run_job(job, lambda: stops["any"] > 0, on_stop=requeue)


@dataclass
class Submission:
    """The tasks one ``gptlab run`` submitted: [(the runner's PlannedRun, submitit job)]."""

    launcher: str
    folder: Path
    parameters: dict
    tasks: list

    @property
    def job_ids(self) -> list[str]:
        return [job.job_id for _, job in self.tasks]

    @property
    def array_id(self) -> str:
        """The job array's id on Slurm (tasks are ID_0, ID_1, ...); the local executor's are pids."""
        ids = self.job_ids
        if self.launcher == "slurm" and ids:
            return ids[0].split("_")[0]
        return ", ".join(ids) if len(ids) <= 4 else f"{ids[0]} ... {ids[-1]}, {len(ids)} in all"


def submit(runner: Any, plan: list, launcher: str, parameters: dict, device: str,
           threads: Optional[int]) -> Submission:
    """Submit every run of ``plan`` (the runner's PlannedRuns) that is not skipped, as one task each
    of one job array, and record them in jobs.json. ``device`` is --device as given: each task
    resolves it where it runs."""
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    runner.start()
    folder = runner.exp_dir / SUBMITIT
    runner.check_inside(folder)
    folder.mkdir(exist_ok=True)
    todo = [planned for planned in plan if planned.action != "skip"]
    if not todo:
        return Submission(launcher, folder, parameters, [])
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
    executor.update_parameters(**parameters)
    # the local executor's controllers must not hold our output open; submitit prints sbatch's complaint
    # before raising it, and that goes into the one line below instead
    quiet = (_children_write_to(folder / "local-controllers.log") if launcher == "local"
             else redirect_stderr(io.StringIO()))
    try:
        with quiet:
            with executor.batch():
                jobs = [executor.submit(RunTask(Job.of(runner, planned, device, threads))) for planned in todo]
    except (FailedJobError, FailedSubmissionError) as exc:
        said = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"sbatch refused the job array ({said}); check --partition, --gpus-per-run, --time and "
                          f"--mem (or the experiment's slurm: section)") from None
    sub = Submission(launcher, folder, parameters, list(zip(todo, jobs)))
    _record(sub)
    return sub


@contextmanager
def _children_write_to(log: Path) -> Iterator[None]:
    """The local executor's controller processes inherit this process's stdout and stderr; when
    those are a pipe (``| tee``, a test reading the output) the reader would wait for every run to
    end. So they start with both pointing at a log file instead."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError):  # no such descriptors: nothing to keep open
        yield
        return
    try:
        with open(log, "ab") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _record(sub: Submission) -> None:
    """Add this submission to jobs.json (which job trains which run), for ``gptlab status``."""
    path = sub.folder / JOBS
    old = rd.read_json(path) or {}
    submissions = old.get("submissions") if isinstance(old.get("submissions"), list) else []
    submissions.append({
        "launcher": sub.launcher, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "parameters": sub.parameters,
        "runs": {planned.run_dir.name: {"job_id": job.job_id, "variant": planned.spec.variant,
                                        "seed": planned.spec.seed}
                 for planned, job in sub.tasks}})
    rd.write_json_atomic(path, {"submissions": submissions})


class _MetricsTail:
    """The rows a task appended to a run's metrics.jsonl since the last look (complete lines only).

    Each look reads at most CHUNK bytes from where the last stopped, from a regular file opened
    without following a link, so a planted or runaway file cannot exhaust memory; a line longer
    than rundir.MAX_METRICS_LINE is skipped whole."""

    CHUNK = 4 << 20

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.skipping = path, 0, False

    def rows(self) -> list[dict]:
        import stat

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return []
            if st.st_size < self.offset:  # a resumed run cut the file back: read it again
                self.offset, self.skipping = 0, False
            data = os.pread(fd, self.CHUNK, self.offset)
        except OSError:
            return []
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1
        if not end:  # no complete line yet; one longer than any row is skipped up to its end
            if len(data) > rd.MAX_METRICS_LINE:
                self.offset, self.skipping = self.offset + len(data), True
            return []
        self.offset += end
        lines = data[:end].splitlines()
        if self.skipping:  # the rest of an over-long line
            lines, self.skipping = lines[1:], False
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows


def wait(sub: Submission, on_progress: Optional[Callable] = None,
         on_finish: Callable[[Any, dict], None] = lambda spec, summary: None,
         poll_s: Optional[float] = None) -> dict[int, Any]:
    """Follow the submitted tasks until each has ended: ``on_progress(spec, state, row)`` for every
    new metrics row the run directories show, ``on_finish(spec, summary)`` as each task ends.
    Returns {plan index: RunOutcome}, as an executor of ``ExperimentRunner`` does (its
    ``outcomes`` adds the runs the plan kept). Polls every ``poll_s`` seconds (default 1 locally,
    5 on Slurm, sparing a shared file system)."""
    poll_s = poll_s if poll_s is not None else 1.0 if sub.launcher == "local" else 5.0
    pending = {planned.index: (planned, job, _MetricsTail(planned.run_dir / rd.METRICS)) for planned, job in sub.tasks}
    results: dict[int, Any] = {}
    while pending:
        for index, (planned, job, tail) in list(pending.items()):
            ended = job.done()  # asked first, so the rows below include all the task wrote
            for row in tail.rows():
                if on_progress:
                    on_progress(planned.spec, Progress(row["step"]), row)
            if ended:
                results[index] = _outcome(job, planned)
                on_finish(planned.spec, results[index].summary)
                del pending[index]
        if pending:
            time.sleep(poll_s)
    return results


def _outcome(job: Any, planned: Any) -> Any:
    """What became of an ended task: the RunOutcome it returned, else what its run directory says."""
    from .runner import RunOutcome

    if job.paths.result_pickle.exists():
        try:
            result = job.result()
        except Exception:  # the task raised: its traceback is in submitit's log
            result = None
        if isinstance(result, RunOutcome):
            return result
    spec, run_dir = planned.spec, planned.run_dir
    summary = rd.read_summary(run_dir)
    status = rd.run_status(run_dir, summary) if summary else rd.FAILED
    how = "without starting the run" if summary is None else "before the run finished"
    return RunOutcome.of(spec, run_dir, "died", {
        "variant": spec.variant, "seed": spec.seed, **(summary or {}), "status": status,
        "error": f"job {job.job_id} ended {how}; see {job.paths.stderr}"})


# -- gptlab status ---------------------------------------------------------------------------------
