"""Runs of one experiment trained side by side in worker processes (``gptlab run --jobs N``), and
the one body every child process runs (``Job`` and ``run_job``, shared with ``launch``'s tasks).

Each pending run is trained in a fresh, spawned process by ``run_job``, exactly as in-process:
same run directory, same lock, same code. A child rebuilds the plugin system from the parent's
build arguments and memory-maps the token cache the parent prepared; a worker reports progress
through a queue. On CPU each worker gets its share of the cores; on CUDA each gets a GPU of its own.

Signals: workers ignore the terminal's Ctrl-C and listen to the parent only. The parent passes
every stop signal it receives on as one SIGTERM, so a worker sees exactly what the parent saw:
the first makes it finish its step, save a resumable state and stop; a second stops it at once.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .experiment import Experiment
    from .runner import ExperimentRunner, PlannedRun, RunOutcome


@dataclass
class Progress:
    """What a worker reports at each log step (the runner's progress callback reads ``.step``)."""

    step: int


@dataclass(frozen=True)
class Job:
    """What a child process needs to train one run as the parent would (pickled to it)."""

    exp: "Experiment"  #: the experiment reduced to this one run
    system_args: dict  #: how to build the parent's plugin system again (build_plugin_system's arguments, cwd)
    results_dir: Path
    device: str  #: resolved in the child: a worker's own device, or --device as given for a task
    force: bool
    restart: bool
    threads: Optional[int]  #: CPU threads; None: the cores the child may use (on CPU)
    index: int  #: the run's place in the parent's plan

    @classmethod
    def of(cls, runner: "ExperimentRunner", planned: "PlannedRun", device: str, threads: Optional[int]) -> "Job":
        return cls(dataclasses.replace(runner.exp, runs=[planned.spec]), dict(runner.plugins.build_args),
                   runner.results_dir, device, runner.force, runner.restart, threads, planned.index)


def run_job(job: Job, should_stop: Callable[[], bool], on_progress: Optional[Callable] = None,
            on_stop: Callable[[], None] = lambda: None) -> "RunOutcome":
    """Train a Job's run in this child process as the parent would train it: the body of every
    ``--jobs`` worker and every launcher task. The run is planned here, as the child starts (a task
    requeued after a stop resumes; a run finished meanwhile is kept). A stop (KeyboardInterrupt, at
    a step boundary once ``should_stop`` is true) calls ``on_stop`` (a task's requeue) and ends in
    an 'interrupted' outcome read back from the run directory."""
    from ..plugin.manager import build_plugin_system
    from ..train.devices import cpu_threads, resolve_device
    from .runner import ExperimentRunner, RunOutcome

    args = dict(job.system_args)  # empty for a plugin system not made by build_plugin_system: the defaults
    cwd = args.pop("cwd", None)
    if cwd is not None:  # relative paths (results dir, plugins) mean what they meant where gptlab ran
        os.chdir(cwd)
    runner = ExperimentRunner(job.exp, build_plugin_system(**args), job.results_dir, resolve_device(job.device),
                              force=job.force, restart=job.restart, should_stop=should_stop,
                              warn=lambda m: sys.stderr.write(f"warning: {m}\n"))
    (planned,) = runner.make_plan()
    if planned.action == "skip":
        return RunOutcome.read(planned.spec, planned.run_dir, "skip")
    threads = job.threads or (cpu_threads(None) if runner.device.type == "cpu" else None)
    try:
        return runner.run_alone(planned, threads, on_progress)
    except KeyboardInterrupt:  # stopped at a step boundary with a resumable state (or at once)
        on_stop()
        return RunOutcome.read(planned.spec, planned.run_dir, "interrupted")


def run_parallel(runner: "ExperimentRunner", todo: list, jobs: int, threads: Optional[int],
                 on_progress: Optional[Callable], on_finish: Callable, signals: Callable[[], int]) -> dict:
    """Train ``todo`` (the runner's PlannedRuns) with up to ``jobs`` workers at once.

    Returns {plan index: RunOutcome}. ``signals()`` counts the stop signals the parent has
    received; each new one is passed on. A worker that dies without reporting is read back from
    its run directory.
    """
    from .runner import RunOutcome

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    devices = _devices(runner.device, jobs)
    free = list(range(jobs))
    running: dict[int, tuple] = {}  # index -> (process, planned run, slot)
    results: dict[int, Any] = {}
    forwarded = 0
    todo = list(todo)
    try:
        while todo or running:
            while todo and free and not signals():
                planned, slot = todo.pop(0), free.pop(0)
                job = Job.of(runner, planned, devices[slot], threads)
                proc = ctx.Process(target=_worker, args=(job, events), name=f"gptlab-run-{planned.index}")
                proc.start()
                running[planned.index] = (proc, planned, slot)
            if signals() and not running:
                break
            forwarded = _forward(running, signals(), forwarded)
            _drain(events, running, results, on_progress, on_finish, timeout=0.2)
            for index, (proc, planned, slot) in list(running.items()):
                if not proc.is_alive():
                    proc.join()
                    _drain(events, running, results, on_progress, on_finish, timeout=0)
                    if index not in results:  # it died without a word: the disk says what became of it
                        results[index] = RunOutcome.read(planned.spec, planned.run_dir, "died")
                        on_finish(planned.spec, results[index].summary)
                    del running[index]
                    free.append(slot)
    except KeyboardInterrupt:  # the parent's second signal: pass it on, then wait for the workers
        forwarded = _forward(running, forwarded + 1, forwarded)
        for proc, *_ in running.values():
            proc.join()
        raise
    return results


def _devices(device: Any, jobs: int) -> list[str]:
    """The device of each worker slot: a GPU each on CUDA (round robin), the same CPU otherwise."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        count = max(1, torch.cuda.device_count())
        first = device.index or 0
        return [f"cuda:{(first + i) % count}" for i in range(jobs)]
    return [str(device)] * jobs


def _forward(running: dict, wanted: int, sent: int) -> int:
    for _ in range(wanted - sent):
        for proc, *_ in running.values():
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
    return max(wanted, sent)


def _drain(events: Any, running: dict, results: dict, on_progress: Optional[Callable], on_finish: Callable,
           timeout: float) -> None:
    while True:
        try:
            kind, index, *payload = events.get(timeout=timeout) if timeout else events.get_nowait()
        except queue_module.Empty:
            return
        timeout = 0
        if kind == "progress" and on_progress and index in running:
            step, row = payload
            on_progress(running[index][1].spec, Progress(step), row)
        elif kind == "done" and index in running:
            (outcome,) = payload
            results[index] = outcome
            on_finish(running[index][1].spec, outcome.summary)


def _worker(job: Job, events: Any) -> None:
    """One run in a worker process (the target of the spawned process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it passes stops on as SIGTERM
    stops = [0]

    def on_term(signum, frame):
        stops[0] += 1
        if stops[0] > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    outcome = run_job(job, lambda: stops[0] > 0,
                      lambda spec, state, row: events.put(("progress", job.index, state.step, row)))
    events.put(("done", job.index, outcome))
    events.close()
    events.join_thread()
    if outcome.action == "interrupted":
        sys.exit(130)
