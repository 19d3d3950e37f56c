"""Run an experiment: one directory per run under results/<experiment>/, nothing ever lost.

``ExperimentRunner`` owns a command's run of an experiment: it loads the file once (``open``),
checks everything and plans every run once (``prepare``), trains the pending runs (``run``) and
returns one typed ``RunOutcome`` per run. Executors above it (``workers`` for ``--jobs``,
``launch`` for ``--launcher``) receive the runner and its plan; it never imports them.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from omegaconf import OmegaConf

from .. import __version__
from ..train import distributed, resume
from .. import rundir as rd
from ..data.tokens import TokenData, prepare_tokens
from ..train.devices import device_name, resolve_device
from ..errors import ConfigError
from .experiment import Experiment, load_experiment
from ..config.run import RunSpec
from ..hf.checkpoint import load_hf_weights
from ..plugin.hookspecs import RunInfo
from ..model.gpt import GPTModel
from ..plugin.manager import PluginSystem
from ..rundir import read_summary, write_json_atomic
from .preflight import check_writable, data_key, experiment_dir, preflight
from .tracking import RunHooks
from .tuning import choose, record
from ..train.loop import Diverged, train_run
from ..train.recipe import make_optimizer


#: what is (or was) done with a run: ``run`` (a new one), ``redo`` (from scratch over an earlier
#: attempt), ``resume`` (from its last resumable state), ``skip`` (finished: kept); and as outcomes
#: only, ``busy`` (another process holds its lock: left to it), ``interrupted`` (stopped, resumable),
#: ``died`` (its worker or task ended without a word), ``follow`` (a torchrun rank other than 0)
Action = Literal["run", "redo", "resume", "skip", "busy", "interrupted", "died", "follow"]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: what ``prepare`` decided to do with it, and where."""

    index: int  #: its place among the experiment's runs
    spec: RunSpec
    action: Action  #: run, redo, resume or skip
    run_dir: Path  #: its existing directory, or the one it will be trained in


@dataclass(frozen=True)
class RunOutcome:
    """What became of one run of a command (see ``Action``), with what its directory holds."""

    spec: RunSpec
    run_dir: Path
    action: Action
    summary: dict  #: summary.json as the run left it (what is known, for a run that has none)
    exists: bool = True  #: whether the run directory exists (a task may die before making it)
    traceback: Optional[Path] = None  #: error.txt of a run that failed in its own code

    @property
    def status(self) -> Optional[str]:
        return self.summary.get("status")

    @classmethod
    def of(cls, spec: RunSpec, run_dir: Path, action: Action, summary: dict) -> "RunOutcome":
        """An outcome, with the run directory's facts read now, beside the run."""
        run_dir = Path(run_dir)
        error = run_dir / rd.ERROR
        failed = summary.get("status") == rd.FAILED and error.is_file()
        return cls(spec, run_dir, action, dict(summary), run_dir.is_dir(), error if failed else None)

    @classmethod
    def read(cls, spec: RunSpec, run_dir: Path, action: Action) -> "RunOutcome":
        """An outcome from the run directory alone (a run stopped, or whose process died): its
        summary, with the status its lock tells ('running' without a holder is 'interrupted')."""
        summary = read_summary(run_dir) or {"variant": spec.variant, "seed": spec.seed}
        return cls.of(spec, run_dir, action, {**summary, "status": rd.run_status(run_dir, summary)})


class ExperimentRunner:
    """Prepares, plans and trains an experiment's runs, each in its own directory, and says what
    became of each one (``RunOutcome``)."""

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
        self.plan: Optional[list[PlannedRun]] = None  # made by prepare(), once; run() trains it
        self.choices: Optional[dict] = None  # with a tune: block, what the tuning runs say (decide())
        self._data: Optional[dict[str, TokenData]] = None
        #: progress(spec) -> a callback for preparing that run's corpus (a progress bar), or None
        self.progress: Optional[Callable] = None

    @classmethod
    def open(cls, path: Path, overrides: list[str] = (), *, results_dir: Path = Path("results"),
             device: str | torch.device = "auto", plugin_dirs: list[Path] = (), track: list[str] = (),
             allow_large: bool = False, **kwargs: Any) -> "ExperimentRunner":
        """The runner of an experiment file, as ``gptlab run`` makes it: the file read once and checked,
        with the command line's ``track`` and ``allow_large`` merged as it is loaded; one plugin system
        (``plugin_dirs`` and the file's ``plugins:``), built when the loader first needs an importer
        (``model: {from_hf: DIR}``) or after it; then ``device`` resolved (auto, cpu, cuda[:N], mps).
        ``kwargs`` are the constructor's (force, restart, should_stop, warn)."""
        from ..plugin.manager import build_plugin_system

        built: list[PluginSystem] = []

        def plugin_system(extra: list) -> PluginSystem:
            if not built:
                built.append(build_plugin_system(plugin_dirs=list(plugin_dirs), extra=extra,
                                                 base_dir=Path(path).resolve().parent))
            return built[0]

        exp = load_experiment(path, overrides, plugins=plugin_system, track=track, allow_large=allow_large)
        plugins = plugin_system(exp.plugin_modules)
        return cls(exp, plugins, results_dir, resolve_device(device) if isinstance(device, str) else device, **kwargs)

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

    def make_plan(self) -> list[PlannedRun]:
        """What to do with every run, as the results directory stands now: run, skip, resume or redo.

        Finished runs are skipped (``force``: trained again from scratch); an unfinished run with a
        resumable state continues from it (``restart``: from scratch); any other is redone.
        ``prepare`` calls this once per command; a child process plans its one run with it.
        """
        out = []
        for index, spec in enumerate(self.exp.runs):
            existing = rd.find_run_dir(self.exp_dir, spec.config_hash, spec.seed)
            summary = read_summary(existing) if existing else None
            if summary and summary.get("status") in rd.FINISHED and not self.force:
                action = "skip"
            elif existing and resume.states(existing) and not (self.restart or self.force):
                action = "resume"
            else:
                action = "redo" if existing else "run"
            out.append(PlannedRun(index, spec, action, existing or self.exp_dir / spec.dir_name))
        return out

    def prepare(self, write: bool = True) -> list[PlannedRun]:
        """Check the results directory, the components and the data before anything trains, then
        plan every run (``self.plan``, which ``run`` trains; under torchrun, rank 0's plan).

        A dry run (``write=False``) makes exactly these checks and creates nothing.
        """
        if self.group.main:
            check_writable(self.results_dir)
            for folder in (self.exp_dir, self.results_dir / ".cache", self.cache_dir):
                if folder.exists():  # already there: each must be writable, and not a planted link
                    self.check_inside(folder)
                    check_writable(folder)
            if write:
                self.remove_orphans()
            self._data = preflight(self.exp, self.plugins, self.cache_dir, write=write, device_type=self.device.type,
                                   progress=self.progress)
        for spec in self.exp.runs:
            if spec.train.batch_size % self.group.world:
                raise ConfigError(f"variant '{spec.variant}': train.batch_size {spec.train.batch_size} is not "
                                  f"divisible by the {self.group.world} processes torchrun started; make it a multiple")
        distributed.barrier(self.group)  # rank 0 has written the token cache: the others read it
        if not self.group.main:
            self._data = preflight(self.exp, self.plugins, self.cache_dir, write=False, device_type=self.device.type)
        self.decide()  # tuning runs over from an earlier command: their variants' comparison runs join the plan
        self.plan = distributed.share(self.make_plan() if self.group.main else None, self.group)
        return self.plan

    def remove_orphans(self) -> None:
        """What a crashed writer left in the token cache, the experiment folder and its run folders
        (``rundir.remove_orphaned_temporaries``), before anything is written again."""
        folders = [self.cache_dir, self.exp_dir]
        if self.exp_dir.is_dir() and not self.exp_dir.is_symlink():
            folders += [p for p in self.exp_dir.iterdir() if p.is_dir() and not p.is_symlink()]
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                rd.remove_orphaned_temporaries(folder)

    def decide(self) -> Optional[dict]:
        """With a ``tune:`` block: each variant's value as its tuning runs stand now (rank 0 reads them,
        every rank gets its answer); the experiment becomes the one with the decided variants'
        comparison runs (``Experiment.tuned``). The preflight of the tuning runs covers those: they
        differ from them only in seed. None without a ``tune:`` block."""
        if self.exp.tune is None:
            return None
        self.choices = distributed.share(choose(self.exp.candidates, self.exp_dir, self.exp.tune)
                                         if self.group.main else None, self.group)
        self.exp = self.exp.tuned(self.choices)
        return self.choices

    def next_phase(self) -> list[PlannedRun]:
        """After the tuning runs have trained: decide again and plan again; returns the planned runs
        that were not in the plan before (the newly decided variants' comparison runs), which the
        caller trains. Empty without a ``tune:`` block or when no new variant was decided."""
        if self.exp.tune is None or self.plan is None:
            return []
        known = {(p.spec.config_hash, p.spec.seed) for p in self.plan}
        self.decide()
        self.plan = distributed.share(self.make_plan() if self.group.main else None, self.group)
        if self.group.main:
            self.start()  # experiment.json: the comparison runs are now the file's definition
        return [p for p in self.plan if (p.spec.config_hash, p.spec.seed) not in known]

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
            "defined": self.exp.defined, "compare": self.exp.compare,
            **({"tuning": record(self.exp.tune, self.choices or {})} if self.exp.tune is not None else {}),
            **({"scale": {"baseline": self.exp.scale.baseline,
                          "sizes": [{k: v for k, v in size.items() if k != "model"} for size in self.exp.scale.resolved],
                          "runs": {h: list(where) for h, where in self.exp.ladder.items()}}}
               if self.exp.scale is not None else {})})

    def run(self, on_progress: Callable[..., Any] = None, jobs: int = 1, threads: Optional[int] = None,
            signals: Optional[Callable[[], int]] = None,
            on_finish: Callable[[RunSpec, dict], None] = lambda spec, summary: None,
            parallel: Optional[Callable[..., dict]] = None,
            on_plan: Callable[[list], None] = lambda added: None) -> list[RunOutcome]:
        """Train every pending run of the plan (``prepare`` first, if it has not been called), with
        ``threads`` CPU threads each; with ``jobs`` > 1, that many at once through ``parallel`` (the
        executor above this layer, e.g. ``workers.run_parallel``). ``on_progress(spec, state, row)`` is
        called at each log step, ``on_finish(spec, summary)`` as each run ends. With a ``tune:``
        block the tuning runs train first, then the comparison runs of the variants they decide
        (``on_plan(added)`` hears of those). Returns one outcome per run, in the experiment's order."""
        if self.plan is None:
            self.prepare()
        if self.group.active and jobs > 1:
            raise ConfigError("--jobs trains several runs at once; under torchrun every process trains the same run: "
                              "use one or the other")
        if jobs > 1 and parallel is None:
            raise ValueError("jobs > 1 needs an executor: pass parallel=gptlab.run.workers.run_parallel")
        if self.group.main:
            self.start()
        todo = [planned for planned in self.plan if planned.action != "skip"]
        done: dict[int, RunOutcome] = {}
        while todo:
            done.update(self._train_todo(todo, jobs, threads, on_progress, on_finish, signals, parallel))
            todo = [planned for planned in self.next_phase() if planned.action != "skip"]
            if todo:
                on_plan(todo)
        if self.group.active:  # the job's runs are done on every rank: leave the group, as torch asks
            distributed.barrier(self.group)
            distributed.leave()
        return self.outcomes(done)

    def _train_todo(self, todo: list[PlannedRun], jobs: int, threads: Optional[int], on_progress: Optional[Callable],
               on_finish: Callable, signals: Optional[Callable[[], int]], parallel: Optional[Callable]) -> dict:
        """Train ``todo`` here, or ``jobs`` at a time through ``parallel``: outcomes by plan index."""
        if jobs > 1 and len(todo) > 1:
            done = parallel(self, todo, jobs, threads, on_progress, on_finish,
                            signals or (lambda: int(self.should_stop())))
            if any(outcome.action == "interrupted" for outcome in done.values()) or self.should_stop():
                raise KeyboardInterrupt
            return done
        return self._run_here(todo, threads, on_progress, on_finish)

    def _run_here(self, todo: list[PlannedRun], threads: Optional[int], on_progress: Optional[Callable],
                  on_finish: Callable[[RunSpec, dict], None]) -> dict[int, RunOutcome]:
        """Train ``todo`` one after another in this process, with ``threads`` CPU threads (this
        process's own setting is restored after, for a caller of ``gptlab.cli.main`` in-process)."""
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        done: dict[int, RunOutcome] = {}
        try:
            for planned in todo:
                if self.should_stop():  # a stop arrived between runs: the pending ones stay pending
                    raise KeyboardInterrupt
                done[planned.index] = self.run_one(planned, self._data[data_key(planned.spec)], on_progress)
                on_finish(planned.spec, done[planned.index].summary)
        finally:
            torch.set_num_threads(before)
        return done

    def outcomes(self, done: dict[int, RunOutcome]) -> list[RunOutcome]:
        """One outcome per run of the plan, in the experiment's order: ``done`` (by plan index, what an
        executor returned for the runs it trained) and, for the runs the plan kept, their summaries."""
        return [done[p.index] if p.action != "skip" else RunOutcome.of(p.spec, p.run_dir, "skip",
                                                                        read_summary(p.run_dir) or {})
                for p in self.plan]

    def run_alone(self, planned: PlannedRun, threads: Optional[int] = None,
                  on_progress: Optional[Callable] = None) -> RunOutcome:
        """Train one run in this process with ``threads`` CPU threads, reading its tokens from the
        cache the parent prepared: the whole job of a child process (``workers.run_job``)."""
        if threads:
            torch.set_num_threads(threads)
        data = prepare_tokens(planned.spec.data, self.plugins, self.cache_dir, base_dir=experiment_dir(self.exp))
        return self.run_one(planned, data, on_progress)

    def run_one(self, planned: PlannedRun, data: TokenData, on_progress: Optional[Callable] = None) -> RunOutcome:
        """Train one run under its lock (or, on a torchrun rank other than 0, follow rank 0)."""
        spec, run_dir = planned.spec, planned.run_dir
        if not self.group.main:
            summary, action = self._follow(spec, run_dir, data)
        elif self.group.active:  # rank 0 decides; _share_decision tells the others
            try:
                summary, action = self._run_one(spec, run_dir, data, on_progress, planned.action)
            finally:
                self._share_decision(None)  # a no-op unless the decision was never sent (an early error)
        else:
            summary, action = self._run_one(spec, run_dir, data, on_progress, planned.action)
        return RunOutcome.of(spec, run_dir, action, summary)

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
                      should_stop=self.should_stop, group=self.group, plugins=self.plugins)
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
            optimizer = make_optimizer(model, t, self.plugins)
            fits = lambda found: resume.check_fits(found, model, optimizer)  # noqa: E731
        except Exception:  # the real build fails the same way, and the run reports it
            fits = None
        return resume.latest(run_dir, self.warn, only=only, steps=t.steps, fits=fits,
                             tokens_per_step=t.batch_size * t.grad_accum * (t.seq_len or spec.model.context_length))

    def _train_locked(self, spec: RunSpec, run_dir: Path, data: TokenData, on_progress,
                      found: Optional[resume.Resumable] = None, previous: Optional[dict] = None) -> dict:
        """Train a run whose lock this process holds, from ``found`` (a resumable state) or from scratch
        over ``previous`` (an earlier attempt's summary); returns its summary. A crash is a result
        (failed, its traceback in error.txt); a stop is recorded (interrupted) and raised on."""
        rows, wall_before, resumed = self._reset(run_dir, found, previous)
        attempt = self._begin(spec, run_dir, found, resumed, rows, wall_before)
        summary = attempt.summary
        try:
            self._train(attempt, data, found, on_progress)
        except Diverged as exc:
            summary.update(status=rd.DIVERGED, diverged_step=exc.step, error=str(exc))
            resume.remove(run_dir)
        except KeyboardInterrupt:
            last = resume.states(run_dir)
            summary.update(status=rd.INTERRUPTED, error="interrupted (Ctrl-C or SIGTERM)"
                           + (f"; resumable from step {last[-1]}" if last else ""))
            self._finish(attempt)
            raise
        except Exception as exc:  # a run's crash is a result; the experiment goes on
            summary.update(status=rd.FAILED, error=f"{type(exc).__name__}: {exc}")
            rd.write_text_atomic(run_dir / rd.ERROR, traceback.format_exc())
        self._finish(attempt)
        return summary

    def _reset(self, run_dir: Path, found: Optional[resume.Resumable],
               previous: Optional[dict]) -> tuple[int, float, list]:
        """Ready the run directory: emptied of an earlier attempt for a run from scratch, metrics.jsonl
        cut back to the rows ``found`` had seen for a resumed one. Returns (metrics rows kept, wall
        time already spent, the steps resumed from so far)."""
        if found is None:  # from scratch: nothing of an earlier attempt may survive
            if previous is not None:  # first say it is unfinished, so no kill below leaves "completed"
                write_json_atomic(run_dir / rd.SUMMARY, {**previous, "status": rd.RUNNING, "pid": os.getpid()})
            resume.remove(run_dir)
            for stale in rd.OUTPUTS:
                rd.refuse_link(run_dir / stale)
                (run_dir / stale).unlink(missing_ok=True)
            return 0, 0.0, []
        rows = found.info["metrics_rows"]
        rd.keep_metric_rows(run_dir, rows)
        resumed = [*((previous or {}).get("resumed_from") or []), found.step]
        return rows, float(found.info.get("wall_time_s", 0.0)), resumed

    def _begin(self, spec: RunSpec, run_dir: Path, found: Optional[resume.Resumable], resumed: list,
               rows: int, wall_before: float) -> "_Attempt":
        """Write the run's config.yaml and its first summary.json (running), and open what the
        training loop's callbacks write to: metrics.jsonl and the lifecycle hooks."""
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
        metrics = rd.open_no_follow(run_dir / rd.METRICS, "a")
        return _Attempt(spec, run_dir, summary, info, hooks, metrics, rows, time.perf_counter() - wall_before)

    def _train(self, attempt: "_Attempt", data: TokenData, found: Optional[resume.Resumable],
               on_progress: Optional[Callable]) -> None:
        """Build the model and train it to the end, filling the attempt's summary (completed)."""
        spec, run_dir, summary = attempt.spec, attempt.run_dir, attempt.summary
        torch.manual_seed(spec.seed)
        model = GPTModel(spec.model, plugins=self.plugins)
        if spec.model.from_hf and found is None:  # a resumed run's state already holds the weights
            load_hf_weights(model, spec.model.from_hf, self.plugins)
        summary["parameters"] = model.num_parameters()
        if self.device.type == "cpu":  # CPU matmuls sum in another order with another thread count
            summary["threads"] = torch.get_num_threads()
        active = model.active_parameters() + (summary["parameters"] - model.num_parameters(exclude_position=True))
        if active != summary["parameters"]:  # experts a token skips: FLOPs and MFU count the active ones
            summary["active_parameters"] = active
        seq_len = spec.train.seq_len or spec.model.context_length
        summary["memory_estimate"] = model.memory_estimate(
            spec.train.batch_size, seq_len,
            dtype="bfloat16" if self.device.type == "cuda" and spec.train.precision != "fp32" else "float32",
            compiled=spec.train.compile)["total"]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        attempt.hooks("gptlab_run_start", run=attempt.info)
        progress = (lambda st, row: on_progress(spec, st, row)) if on_progress else (lambda st, row: None)
        summary.update(train_run(spec, data, model, self.device, attempt.on_log, attempt.on_eval, progress,
                                 state_dir=run_dir, resume_from=found, state_info=attempt.state_info,
                                 should_stop=self.should_stop, group=self.group, warn=self.warn,
                                 plugins=self.plugins))
        if self.group.active:
            summary["world_size"] = self.group.world
        summary["status"] = rd.COMPLETED
        if spec.train.checkpoint:
            self.save_checkpoint(model, data, run_dir)
        resume.remove(run_dir)

    def _finish(self, attempt: "_Attempt") -> None:
        summary, run_dir, info, hooks = attempt.summary, attempt.run_dir, attempt.info, attempt.hooks
        attempt.metrics.close()
        summary["wall_time_s"] = time.perf_counter() - attempt.start
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


@dataclass
class _Attempt:
    """One attempt at a run while this process trains it: what the loop's callbacks write to."""

    spec: RunSpec
    run_dir: Path
    summary: dict
    info: RunInfo
    hooks: RunHooks
    metrics: Any  #: metrics.jsonl, open for appending
    rows: int  #: the rows metrics.jsonl holds
    start: float  #: perf_counter at the start, less the wall time spent before a resume

    def on_log(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.rows += 1
        self.summary["step"] = row["step"]
        self.hooks("gptlab_log", run=self.info, step=row["step"], metrics=row)

    def on_eval(self, row: dict) -> None:
        self.hooks("gptlab_eval", run=self.info, step=row["step"], metrics=row)

    def state_info(self) -> dict:
        """What a resumable state records beside the tensors: the rows written, the time spent."""
        return {"metrics_rows": self.rows, "wall_time_s": time.perf_counter() - self.start}
