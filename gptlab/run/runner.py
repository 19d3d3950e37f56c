"""Run an experiment: one directory per run under results/<experiment>/, nothing ever lost.

The files of a run directory are described in ``gptlab.rundir``. Completed and diverged runs
are results and are skipped on rerun; the others are redone.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from .. import __version__
from ..train import distributed, resume
from .. import rundir as rd
from ..data.tokens import TokenData, prepare_tokens
from ..train.devices import device_name
from ..errors import ConfigError
from .experiment import Experiment
from ..config.run import RunSpec
from ..hf.checkpoint import load_hf_weights
from ..plugin.hookspecs import RunInfo
from ..model.gpt import GPTModel
from ..plugin.manager import PluginSystem
from ..rundir import read_summary, write_json_atomic
from .preflight import check_writable, data_key, preflight
from .tracking import RunHooks
from ..train.loop import Diverged, make_optimizer, train_run


class ExperimentRunner:
    """Trains every pending run of an experiment and records each one in its own directory."""

    def __init__(self, exp: Experiment, plugins: PluginSystem, results_dir: Path, device: torch.device,
                 force: bool = False, restart: bool = False, should_stop: Callable[[], bool] = lambda: False,
                 warn: Callable[[str], None] = lambda message: None) -> None:
        self.exp, self.plugins, self.device, self.force, self.restart = exp, plugins, device, force, restart
        self.group = distributed.from_env()
        if self.group.active:  # under torchrun: join the job; rank 0 decides and writes, the others follow
            self.device = distributed.join(self.group, device)
            if not self.group.main:
                warn = lambda message: None  # noqa: E731 - rank 0 says it once
        elif self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # a --jobs worker on cuda:N: its kernels and allocations land there
        self.results_dir = Path(results_dir)
        self.exp_dir = self.results_dir / exp.name
        self.cache_dir = self.results_dir / ".cache" / "tokens"
        self.should_stop, self.warn = should_stop, warn

    def check_inside(self, path: Path) -> None:
        """Refuse to write into ``path`` when it is a planted link or resolves outside --results-dir."""
        path = Path(path)
        for part in (path, *path.parents):  # the folders gptlab made below --results-dir
            if part == self.results_dir or part in (Path("."), Path(path.anchor)):
                break
            rd.refuse_link(part)
        root = self.results_dir.resolve()
        if path.exists() and not path.resolve().is_relative_to(root):
            raise ConfigError(f"{path} resolves outside --results-dir {self.results_dir}; remove it")

    def plan(self) -> list[tuple[RunSpec, Optional[Path], str]]:
        """(spec, existing dir, action) for every run; action is run, skip, resume or redo.

        Finished runs are skipped (``force``: trained again from scratch); an unfinished run with a
        resumable state continues from it (``restart``: from scratch); any other is redone.
        """
        out = []
        for spec in self.exp.runs:
            existing = rd.find_run_dir(self.exp_dir, spec.config_hash, spec.seed)
            summary = read_summary(existing) if existing else None
            if summary and summary.get("status") in rd.FINISHED and not self.force:
                out.append((spec, existing, "skip"))
            elif existing and resume.states(existing) and not (self.restart or self.force):
                out.append((spec, existing, "resume"))
            elif existing:
                out.append((spec, existing, "redo"))
            else:
                out.append((spec, None, "run"))
        return out

    def prepare(self, write: bool = True) -> None:
        """Check the results directory, the components and the data before anything trains.

        A dry run (``write=False``) makes exactly these checks and creates nothing.
        """
        if self.group.main:
            check_writable(self.results_dir)
            for folder in (self.exp_dir, self.results_dir / ".cache", self.cache_dir):
                if folder.exists():  # already there: each must be writable, and not a planted link
                    self.check_inside(folder)
                    check_writable(folder)
            self._data = preflight(self.exp, self.plugins, self.cache_dir, write=write)
        for spec in self.exp.runs:
            if spec.train.batch_size % self.group.world:
                raise ConfigError(f"variant '{spec.variant}': train.batch_size {spec.train.batch_size} is not "
                                  f"divisible by the {self.group.world} processes torchrun started; make it a multiple")
        distributed.barrier(self.group)  # rank 0 has written the token cache: the others read it
        if not self.group.main:
            self._data = preflight(self.exp, self.plugins, self.cache_dir, write=False)

    @classmethod
    def rebuild(cls, job: dict, plugin_args: dict, **kwargs: Any) -> "ExperimentRunner":
        """The runner of a worker process: the parent's experiment and settings, its own plugin system."""
        from ..train.devices import resolve_device
        from ..plugin.manager import build_plugin_system

        plugins = build_plugin_system(**plugin_args)
        return cls(job["exp"], plugins, job["results_dir"], resolve_device(job["device"]), force=job["force"],
                   restart=job["restart"], **kwargs)

    def start(self) -> None:
        """Create results/<experiment>/ and record the experiment as its file defines it (experiment.json)."""
        self.check_inside(self.exp_dir)
        try:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.exp_dir} ({exc.strerror}); choose another --results-dir") from None
        write_json_atomic(self.exp_dir / rd.EXPERIMENT, {
            "name": self.exp.name, "description": self.exp.description,
            "source": str(self.exp.path.resolve()) if self.exp.path else None, "base": self.exp.base,
            "variants": list(dict.fromkeys(self.exp.defined.values())) or self.exp.variants,
            "defined": self.exp.defined, "compare": self.exp.compare})

    def run(self, on_progress: Callable[..., Any] = None, jobs: int = 1, threads: Optional[int] = None,
            signals: Optional[Callable[[], int]] = None,
            on_finish: Callable[[RunSpec, dict], None] = lambda spec, summary: None,
            parallel: Optional[Callable[..., dict]] = None) -> list[dict]:
        """Train every pending run; with ``jobs`` > 1, that many at once through ``parallel`` (the
        executor above this layer, e.g. ``workers.run_parallel``; ``threads`` CPU threads each). ``on_progress(spec, state, row)`` is called at each log
        step, ``on_finish(spec, summary)`` as each run ends. Returns one summary per run, in the
        experiment's order."""
        if getattr(self, "_data", None) is None:
            self.prepare()
        data_by_key = self._data
        if self.group.active and jobs > 1:
            raise ConfigError("--jobs trains several runs at once; under torchrun every process trains the same run: "
                              "use one or the other")
        if self.group.main:
            self.start()
        plan = distributed.share(self.plan() if self.group.main else None, self.group)
        todo = [(i, spec, existing, action) for i, (spec, existing, action) in enumerate(plan) if action != "skip"]
        done: dict[int, dict] = {}
        if jobs > 1 and parallel is None:
            raise ValueError("jobs > 1 needs an executor: pass parallel=gptlab.run.workers.run_parallel")
        if jobs > 1 and len(todo) > 1:
            done = parallel(self, todo, jobs, threads, on_progress, on_finish,
                                signals or (lambda: int(self.should_stop())))
            if any(r.get("_action") == "interrupted" for r in done.values()) or self.should_stop():
                raise KeyboardInterrupt
        else:
            for i, spec, existing, action in todo:
                if self.should_stop():  # a stop arrived between runs: the pending ones stay pending
                    raise KeyboardInterrupt
                run_dir = existing or self.exp_dir / spec.dir_name
                summary, action = self.run_one(spec, run_dir, data_by_key[data_key(spec)], on_progress, action)
                done[i] = summary | {"_dir": str(run_dir), "_action": action}
                on_finish(spec, summary)
        return [done[i] if action != "skip" else read_summary(existing) | {"_dir": str(existing), "_action": "skip"}
                for i, (spec, existing, action) in enumerate(plan)]

    def run_one(self, spec: RunSpec, run_dir: Path, data: TokenData, on_progress=None,
                action: str = "run") -> tuple[dict, str]:
        """Train one run under its lock; returns (summary, action taken)."""
        if not self.group.main:
            return self._follow(spec, run_dir, data)
        if self.group.active:  # rank 0 decides; _share_decision tells the others
            try:
                summary, action = self._run_one(spec, run_dir, data, on_progress, action)
            finally:
                self._share_decision(None)  # a no-op unless the decision was never sent (an early error)
            return summary, action
        return self._run_one(spec, run_dir, data, on_progress, action)

    def _share_decision(self, decision: Optional[tuple]) -> None:
        """Rank 0's verdict on the current run, sent once: ("train", resume step or None) or ("skip",)."""
        if self.group.active and not getattr(self, "_decided", False):
            self._decided = True
            distributed.share(decision if decision is not None else ("skip",), self.group)

    def _follow(self, spec: RunSpec, run_dir: Path, data: TokenData) -> tuple[dict, str]:
        """A rank other than 0: train the run rank 0 trains, from the state it chose, writing nothing."""
        decision = distributed.share(None, self.group)
        if decision[0] != "train":
            return {}, "skip"
        found = self.usable_state(spec, run_dir, only=decision[1]) if decision[1] is not None else None
        torch.manual_seed(spec.seed)
        model = GPTModel(spec.model, plugins=self.plugins)
        if spec.model.from_hf and found is None:
            load_hf_weights(model, spec.model.from_hf, self.plugins)
        try:
            train_run(spec, data, model, self.device, lambda row: None, lambda row: None, resume_from=found,
                      should_stop=self.should_stop, group=self.group)
        except Diverged:
            pass  # rank 0 records it
        return {}, "follow"

    def _run_one(self, spec: RunSpec, run_dir: Path, data: TokenData, on_progress, action: str) -> tuple[dict, str]:
        self._decided = False
        self.check_inside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with rd.open_no_follow(run_dir / rd.LOCK, "lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another gptlab process is training this very run: leave it to that one
                return {"variant": spec.variant, "seed": spec.seed, "status": rd.RUNNING}, "busy"
            summary = read_summary(run_dir)
            if summary and summary.get("status") in rd.FINISHED and not self.force:
                return summary, "skip"  # finished by another process since we planned
            rd.clean_stale_temporaries(run_dir)  # what a killed writer left; we hold the lock
            found = self.usable_state(spec, run_dir) if action == "resume" else None
            if found is None:
                action = "redo" if action == "resume" else action
            self._share_decision(("train", found.step if found else None))
            return self._train_locked(spec, run_dir, data, on_progress, found, summary), action

    def usable_state(self, spec: RunSpec, run_dir: Path, only: Optional[int] = None) -> Optional[resume.Resumable]:
        """The newest resumable state of ``run_dir`` that is within this run, consistent with its
        metrics.jsonl and fits its model (checked against a model built on the meta device, so
        nothing is allocated); each one that is not is skipped with a warning naming it."""
        t = spec.train
        try:
            with torch.device("meta"):
                model = GPTModel(spec.model, plugins=self.plugins)
            optimizer = make_optimizer(model, t, torch.device("cpu"))
            fits = lambda found: resume.check_fits(found, model, optimizer)  # noqa: E731
        except Exception:  # the real build fails the same way, and the run reports it
            fits = None
        return resume.latest(run_dir, self.warn, only=only, steps=t.steps, fits=fits,
                             tokens_per_step=t.batch_size * t.grad_accum * (t.seq_len or spec.model.context_length))

    def _train_locked(self, spec: RunSpec, run_dir: Path, data: TokenData, on_progress,
                      found: Optional[resume.Resumable] = None, previous: Optional[dict] = None) -> dict:
        if found is None:  # from scratch: nothing of an earlier attempt may survive
            if previous is not None:  # first say it is unfinished, so no kill below leaves "completed"
                write_json_atomic(run_dir / rd.SUMMARY, {**previous, "status": rd.RUNNING, "pid": os.getpid()})
            resume.remove(run_dir)
            for stale in rd.OUTPUTS:
                rd.refuse_link(run_dir / stale)
                (run_dir / stale).unlink(missing_ok=True)
            rows, wall_before, resumed = 0, 0.0, []
        else:  # continue: metrics.jsonl back to the rows the state had seen
            rows = found.info["metrics_rows"]
            rd.keep_metric_rows(run_dir, rows)
            wall_before = float(found.info.get("wall_time_s", 0.0))
            resumed = [*((previous or {}).get("resumed_from") or []), found.step]
        resolved = spec.resolved()
        meta = {"experiment": self.exp.name, "variant": spec.variant, "seed": spec.seed,
                "config_hash": spec.config_hash, "changes": spec.changes, "overrides": self.exp.overrides}
        rd.write_text_atomic(run_dir / rd.CONFIG, OmegaConf.to_yaml(OmegaConf.create({**meta, **resolved})))
        summary: dict[str, Any] = {
            **meta, "status": rd.RUNNING, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
            "device": device_name(self.device), "versions": self.versions(), "plugins": self.plugin_versions()}
        if resumed:
            summary["resumed_from"] = resumed
        write_json_atomic(run_dir / rd.SUMMARY, summary)
        info = RunInfo(run_dir, spec.variant, spec.seed, {**meta, **resolved, "track": list(self.exp.track)},
                       self.exp.name, resumed_from=found.step if found else None)
        hooks = RunHooks(self.plugins, info, self.warn)  # one failing plugin is switched off, not the run
        metrics_fh = rd.open_no_follow(run_dir / rd.METRICS, "a")

        written = [rows]

        def on_log(row: dict) -> None:
            metrics_fh.write(json.dumps(row) + "\n")
            metrics_fh.flush()
            written[0] += 1
            summary["step"] = row["step"]
            hooks("gptlab_log", run=info, step=row["step"], metrics=row)

        def on_eval(row: dict) -> None:
            hooks("gptlab_eval", run=info, step=row["step"], metrics=row)

        start = time.perf_counter() - wall_before
        try:
            torch.manual_seed(spec.seed)
            model = GPTModel(spec.model, plugins=self.plugins)
            if spec.model.from_hf and found is None:  # a resumed run's state already holds the weights
                load_hf_weights(model, spec.model.from_hf, self.plugins)
            summary["parameters"] = model.num_parameters()
            seq_len = spec.train.seq_len or spec.model.context_length
            summary["memory_estimate"] = model.memory_estimate(
                spec.train.batch_size, seq_len,
                dtype="bfloat16" if self.device.type == "cuda" and spec.train.precision != "fp32" else "float32",
                compiled=spec.train.compile)["total"]
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            hooks("gptlab_run_start", run=info)
            progress = (lambda st, row: on_progress(spec, st, row)) if on_progress else (lambda st, row: None)
            state_info = lambda: {"metrics_rows": written[0], "wall_time_s": time.perf_counter() - start}  # noqa: E731
            summary.update(train_run(spec, data, model, self.device, on_log, on_eval, progress, state_dir=run_dir,
                                     resume_from=found, state_info=state_info, should_stop=self.should_stop,
                                     group=self.group, warn=self.warn))
            if self.group.active:
                summary["world_size"] = self.group.world
            summary["status"] = rd.COMPLETED
            if spec.train.checkpoint:
                self.save_checkpoint(model, data, run_dir)
            resume.remove(run_dir)
        except Diverged as exc:
            summary.update(status=rd.DIVERGED, diverged_step=exc.step, error=str(exc))
            resume.remove(run_dir)
        except KeyboardInterrupt:
            last = resume.states(run_dir)
            summary.update(status=rd.INTERRUPTED, error="interrupted (Ctrl-C or SIGTERM)"
                           + (f"; resumable from step {last[-1]}" if last else ""))
            self._finish(summary, run_dir, start, metrics_fh, info, hooks)
            raise
        except Exception as exc:  # a run's crash is a result; the experiment goes on
            summary.update(status=rd.FAILED, error=f"{type(exc).__name__}: {exc}")
            rd.write_text_atomic(run_dir / rd.ERROR, traceback.format_exc())
        self._finish(summary, run_dir, start, metrics_fh, info, hooks)
        return summary

    def _finish(self, summary: dict, run_dir: Path, start: float, metrics_fh, info: RunInfo, hooks: RunHooks) -> None:
        metrics_fh.close()
        summary["wall_time_s"] = time.perf_counter() - start
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        summary.pop("pid", None)
        if self.device.type == "cuda":
            summary["peak_memory"] = torch.cuda.max_memory_allocated(self.device)
        summary.update(hooks.record())
        write_json_atomic(run_dir / rd.SUMMARY, summary)
        hooks("gptlab_run_end", run=info, summary=summary)  # a sink that fails here is reported, the run kept
        if hooks.record():  # add the end hooks' time and failures
            summary.update(hooks.record())
            write_json_atomic(run_dir / rd.SUMMARY, summary)

    def save_checkpoint(self, model: GPTModel, data: TokenData, run_dir: Path) -> None:
        from safetensors.torch import save_model

        tmp = run_dir / f".{rd.MODEL}.tmp"
        tmp.unlink(missing_ok=True)  # a stale one, or a planted link: never written through
        save_model(model, str(tmp))
        os.replace(tmp, run_dir / rd.MODEL)
        write_json_atomic(run_dir / rd.TOKENIZER, {"state": data.tokenizer.state_dict(),
                                                       "vocab_size": data.tokenizer.vocab_size})

    def versions(self) -> dict:
        return {"gptlab": __version__, "torch": torch.__version__, "python": platform.python_version()}

    def plugin_versions(self) -> dict:
        return {p.name: f"{p.source} {p.version}" for p in self.plugins.plugins}


def run_in_process(runner: ExperimentRunner, spec: RunSpec, run_dir: Path, action: str, threads: Optional[int],
                   on_progress: Optional[Callable] = None) -> tuple[dict, str]:
    """Train one run in this process with ``threads`` CPU threads (a worker's whole job)."""
    if threads:
        torch.set_num_threads(threads)
    data = prepare_tokens(spec.data, runner.plugins, runner.cache_dir)
    return runner.run_one(spec, run_dir, data, on_progress, action)
