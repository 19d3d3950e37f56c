"""Runs of one experiment trained side by side in worker processes (``gptlab run --jobs N``).

Each pending run is trained by ``ExperimentRunner.run_one`` in a fresh, spawned process, exactly
as in-process: same run directory, same lock, same code. A worker rebuilds the plugin system from
the parent's build arguments and memory-maps the token cache the parent prepared; it reports
progress through a queue. On CPU each worker gets its share of the cores; on CUDA each gets a
GPU of its own.

Signals: workers ignore the terminal's Ctrl-C and listen to the parent only. The parent passes
every stop signal it receives on as one SIGTERM, so a worker sees exactly what the parent saw:
the first makes it finish its step, save a resumable state and stop; a second stops it at once.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .. import rundir as rd


@dataclass
class Progress:
    """What a worker reports at each log step (the runner's progress callback reads ``.step``)."""

    step: int


def run_parallel(runner: Any, todo: list, jobs: int, threads: Optional[int], on_progress: Optional[Callable],
                 on_finish: Callable, signals: Callable[[], int]) -> dict:
    """Train ``todo`` ([(index, spec, existing dir, action)]) with up to ``jobs`` workers at once.

    Returns {index: summary with _dir and _action}. ``signals()`` counts the stop signals the
    parent has received; each new one is passed on. A worker that dies without reporting is
    read back from its run directory.
    """
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    devices = _devices(runner.device, jobs)
    free = list(range(jobs))
    running: dict[int, tuple] = {}  # index -> (process, spec, run_dir, slot)
    results: dict[int, dict] = {}
    forwarded = 0
    todo = list(todo)
    try:
        while todo or running:
            while todo and free and not signals():
                index, spec, existing, action = todo.pop(0)
                run_dir = existing or runner.exp_dir / spec.dir_name
                slot = free.pop(0)
                job = {"exp": runner.exp, "plugins": runner.plugins.build_args, "results_dir": runner.results_dir,
                       "device": devices[slot], "force": runner.force, "restart": runner.restart,
                       "spec": spec, "run_dir": run_dir, "action": action, "threads": threads}
                proc = ctx.Process(target=_worker, args=(job, index, events), name=f"gptlab-run-{index}")
                proc.start()
                running[index] = (proc, spec, run_dir, slot)
            if signals() and not running:
                break
            forwarded = _forward(running, signals(), forwarded)
            _drain(events, running, results, on_progress, on_finish, timeout=0.2)
            for index, (proc, spec, run_dir, slot) in list(running.items()):
                if not proc.is_alive():
                    proc.join()
                    _drain(events, running, results, on_progress, on_finish, timeout=0)
                    if index not in results:  # it died without a word: the disk says what became of it
                        summary = rd.read_summary(run_dir) or {"variant": spec.variant, "seed": spec.seed}
                        status = rd.run_status(run_dir, summary)
                        results[index] = {**summary, "status": status, "_dir": str(run_dir), "_action": "died"}
                        on_finish(spec, results[index])
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
            on_progress(running[index][1], Progress(step), row)
        elif kind == "done" and index in running:
            summary, action = payload
            results[index] = {**summary, "_dir": str(running[index][2]), "_action": action}
            on_finish(running[index][1], summary)


def _worker(job: dict, index: int, events: Any) -> None:
    """One run in a worker process (the target of the spawned process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it passes stops on as SIGTERM
    stops = [0]

    def on_term(signum, frame):
        stops[0] += 1
        if stops[0] > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    from .runner import ExperimentRunner, run_in_process

    args = dict(job["plugins"])  # empty for a plugin system not made by build_plugin_system: the defaults
    cwd = args.pop("cwd", None)
    if cwd is not None:
        os.chdir(cwd)
    run_dir: Path = job["run_dir"]
    try:
        runner = ExperimentRunner.rebuild(job, args, should_stop=lambda: stops[0] > 0,
                                          warn=lambda m: sys.stderr.write(f"warning: {m}\n"))
        summary, action = run_in_process(runner, job["spec"], run_dir, job["action"], job["threads"],
                                          lambda spec, state, row: events.put(("progress", index, state.step, row)))
    except KeyboardInterrupt:
        summary = rd.read_summary(run_dir) or {}
        events.put(("done", index, {**summary, "status": rd.run_status(run_dir, summary)}, "interrupted"))
        events.close()
        events.join_thread()
        sys.exit(130)
    events.put(("done", index, summary, action))
    events.close()
    events.join_thread()
