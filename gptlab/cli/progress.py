"""What ``gptlab run`` prints while it trains.

On a terminal: an experiment line (run k of N, done and failed counts, an ETA for the whole
experiment) above one bar per run in flight (step, train/val loss, tokens/s, the run's ETA).
Elsewhere (nohup, a Slurm log, a pipe): one plain, flushed line per log step per run and one per
finished run, no ANSI codes. ``--quiet``: nothing but errors and the final table.

ETAs come from measured steps: a run's from its own steps/second since its first log step, the
experiment's from the steps all runs did per second of wall time so far (runs in parallel
included) applied to the steps still to go. So neither is blank after the first log step.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional

from .. import fmt
from ..rundir import COMPLETED, FAILED


def make_reporter(exp: Any, plan: list, quiet: bool, console: Any) -> "Reporter":
    if quiet:
        return Reporter(exp, plan)
    if console.is_terminal:
        return RichReporter(exp, plan, console)
    return PlainReporter(exp, plan)


class Reporter:
    """Counts steps and runs; prints nothing (``--quiet``). Subclasses print."""

    def __init__(self, exp: Any, plan: list) -> None:
        self.exp = exp
        todo = [planned.spec for planned in plan if planned.action != "skip"]  # the runner's PlannedRuns
        self.n_runs, self.kept = len(plan), len(plan) - len(todo)
        self.total_steps = sum(spec.train.steps for spec in todo)
        self.steps: dict[str, int] = {}  # run -> steps done (as of its last log step)
        self.first: dict[str, tuple[float, int]] = {}  # run -> (time, step) of its first log step
        self.done = self.failed = 0
        self.started = time.perf_counter()

    def extend(self, added: list) -> None:
        """More runs to train (the comparison runs a ``tune:`` block decides after its tuning runs)."""
        todo = [planned.spec for planned in added if planned.action != "skip"]
        self.n_runs += len(added)
        self.kept += len(added) - len(todo)
        self.total_steps += sum(spec.train.steps for spec in todo)
        self.on_extend()

    def on_extend(self) -> None:
        pass

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    # -- the runner's callbacks --------------------------------------------------------------
    def progress(self, spec: Any, state: Any, row: dict) -> None:
        key = spec.dir_name
        now = time.perf_counter()
        self.first.setdefault(key, (now, state.step))
        self.steps[key] = state.step
        self.on_row(spec, row, self.run_eta(key, spec, now, row))

    def finish(self, spec: Any, summary: dict) -> None:
        self.done += 1
        self.failed += summary.get("status") == FAILED
        self.steps[spec.dir_name] = spec.train.steps
        self.on_finish(spec, summary)

    # -- estimates -----------------------------------------------------------------------------
    def run_eta(self, key: str, spec: Any, now: float, row: dict) -> Optional[float]:
        """Seconds left for a run: its wall-clock pace since its first log step (evaluations
        included), or at that first step the pace of the row's own tokens/s."""
        t0, s0 = self.first[key]
        done, left = self.steps[key] - s0, spec.train.steps - self.steps[key]
        if done > 0 and now > t0:
            return (now - t0) / done * left
        if row.get("tokens_per_s"):
            seq_len = spec.train.seq_len or spec.model.context_length
            return left * spec.train.batch_size * spec.train.grad_accum * seq_len / row["tokens_per_s"]
        return None

    def experiment_eta(self) -> Optional[float]:
        done = sum(self.steps.values())
        elapsed = time.perf_counter() - self.started
        return elapsed / done * (self.total_steps - done) if done and elapsed > 0 else None

    def headline(self) -> str:
        in_flight = len(self.steps) - self.done
        return (f"{self.exp.name}: run {min(self.done + max(in_flight, 1), self.n_runs - self.kept)} of "
                f"{self.n_runs - self.kept} · {self.done} done · {self.failed} failed"
                + (f" · {self.kept} kept" if self.kept else "")
                + f" · eta {fmt.duration(self.experiment_eta()) if self.experiment_eta() is not None else '-'}")

    def on_row(self, spec: Any, row: dict, eta: Optional[float]) -> None:
        pass

    def on_finish(self, spec: Any, summary: dict) -> None:
        pass


def _row_text(row: dict) -> str:
    parts = [f"train {row['train_loss']:.4f}"]
    if row.get("val_loss") is not None:
        parts.append(f"val {row['val_loss']:.4f}")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    return " ".join(parts)


class PlainReporter(Reporter):
    """One flushed line per log step per run; for logs that are not a terminal."""

    def __init__(self, exp: Any, plan: list, stream: Any = None) -> None:
        super().__init__(exp, plan)
        self.stream = stream or sys.stderr

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def on_row(self, spec: Any, row: dict, eta: Optional[float]) -> None:
        self._say(f"[{self.exp.name} {spec.variant} s{spec.seed}] step {row['step']}/{spec.train.steps} "
                  f"{_row_text(row)} eta {fmt.duration(eta) if eta is not None else '-'}")

    def on_finish(self, spec: Any, summary: dict) -> None:
        val = summary.get("final_val_loss")
        self._say(f"[{self.exp.name} {spec.variant} s{spec.seed}] {summary.get('status')}"
                  + (f" val {val:.4f}" if isinstance(val, (int, float)) else "") + f" | {self.headline()}")


class RichReporter(Reporter):
    """An experiment line above a bar per run in flight; finished runs leave one printed line."""

    def __init__(self, exp: Any, plan: list, console: Any) -> None:
        super().__init__(exp, plan)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress_bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     TextColumn("eta {task.fields[eta]}"), console=console, transient=True)
        self.overall = self.progress_bar.add_task(self._headline_text(), total=max(1, self.total_steps),
                                                  info="", eta="-")
        self.tasks: dict[str, Any] = {}

    def _headline_text(self) -> str:
        from rich.markup import escape

        return f"[bold]{escape(self.headline().rsplit(' · eta', 1)[0])}[/]"

    def __enter__(self) -> "RichReporter":
        self.progress_bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress_bar.__exit__(*exc)

    def on_extend(self) -> None:
        self.progress_bar.update(self.overall, total=max(1, self.total_steps))
        self._update_overall()

    def _update_overall(self) -> None:
        eta = self.experiment_eta()
        self.progress_bar.update(self.overall, completed=sum(self.steps.values()), description=self._headline_text(),
                                 eta=fmt.duration(eta) if eta is not None else "-")

    def on_row(self, spec: Any, row: dict, eta: Optional[float]) -> None:
        from rich.markup import escape

        key = spec.dir_name
        if key not in self.tasks:
            self.tasks[key] = self.progress_bar.add_task(escape(f"  {spec.variant} s{spec.seed}"),
                                                         total=spec.train.steps, info="", eta="-")
        self.progress_bar.update(self.tasks[key], completed=row["step"], info=escape(_row_text(row)),
                                 eta=fmt.duration(eta) if eta is not None else "-")
        self._update_overall()

    def on_finish(self, spec: Any, summary: dict) -> None:
        from rich.text import Text

        task = self.tasks.pop(spec.dir_name, None)
        if task is not None:
            self.progress_bar.remove_task(task)
        val = summary.get("final_val_loss")
        status = str(summary.get("status"))
        self.progress_bar.console.print(Text.assemble(
            f"{spec.variant} s{spec.seed} ", (status, "green" if status == COMPLETED else "red"),
            f"  val {val:.4f}" if isinstance(val, (int, float)) else "",
            f"  {fmt.duration(summary.get('wall_time_s'))}"))
        self._update_overall()
