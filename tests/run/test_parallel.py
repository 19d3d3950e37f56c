"""``gptlab run --jobs N``: runs side by side give the same results as one by one; the rules hold.

Real ``python -m gptlab run`` subprocesses on one thread per run. Output is not a terminal here, so
these also check the plain progress lines a log file gets.
"""
from __future__ import annotations

import fcntl
import json
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import HOLD_PLUGIN, held, hold, release, run_subprocess, write_lab

EXP = {
    "name": "par",
    "model": {"preset": "nano", "n_layers": 1, "context_length": 32, "drop_rate": 0.1},
    "train": {"steps": 12, "batch_size": 4, "log_every": 3, "eval_every": 6, "eval_batches": 1,
              "checkpoint_every": 3},
    "variants": {"a": {}, "b": {"model": {"norm_placement": "post"}}},
    "seeds": [0, 1],
}
BOOM = '''
import gptlab
from gptlab import CausalSelfAttention
import torch.nn.functional as F


class Boom(CausalSelfAttention):
    """Fails on its fifth forward."""

    calls = 0

    def attend(self, q, k, v, ctx):
        Boom.calls += 1
        if Boom.calls == 5:
            raise RuntimeError("boom")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "boom", Boom)
'''
KEYS = ("step", "tokens", "train_loss", "val_loss", "lr")


def lab(root: Path, **changes) -> Path:
    return write_lab(root, {**EXP, **changes}, plugins={"hold.py": HOLD_PLUGIN, "boom.py": BOOM}).parent


def gptlab(root: Path, *args: str, wait: bool = True):
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", "--threads", "1", *args, cwd=root, wait=False)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def runs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "results" / "par").iterdir()) if p.is_dir()}


def rows(run_dir: Path) -> list[tuple]:
    return [tuple(json.loads(line).get(k) for k in KEYS) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    root = lab(tmp_path_factory.mktemp("seq") / "lab")
    rc, out, err = gptlab(root)
    assert rc == 0, err
    return root


def test_two_at_once_equals_one_by_one_and_logs_plain_lines(sequential, tmp_path):
    root = lab(tmp_path / "lab")
    rc, out, err = gptlab(root, "--jobs", "2")
    assert rc == 0, err
    assert runs(root).keys() == runs(sequential).keys() and len(runs(root)) == 4
    for name, run_dir in runs(root).items():
        assert rows(run_dir) == rows(runs(sequential)[name]), name
        for key in ("status", "final_val_loss", "final_train_loss", "best_val_loss", "tokens", "init_grad_norms"):
            assert summary(run_dir)[key] == summary(runs(sequential)[name])[key], (name, key)
    # not a terminal: one plain line per log step per run, and one per finished run, no ANSI codes
    assert "\x1b[" not in err
    step_lines = [line for line in err.splitlines() if re.fullmatch(
        r"\[par [ab] s[01]\] step \d+/12 train \d+\.\d{4}( val \d+\.\d{4})?( [\d,]+ tok/s)? eta \S+", line)]
    assert len(step_lines) == 4 * 4  # log steps 3, 6, 9, 12 of each run
    assert not [line for line in step_lines if line.endswith("eta -") and " step 3/" not in line]
    done = [line for line in err.splitlines() if re.match(r"\[par [ab] s[01]\] completed val \d", line)]
    assert len(done) == 4 and done[-1].endswith("4 done · 0 failed · eta 0.0s")
    assert "variant" in out and "Δ vs a" in out  # the final table

    rc, out, err = gptlab(root, "--jobs", "2", "--quiet")  # everything is finished: kept, nothing trained
    assert rc == 0 and "step" not in err and "Δ vs a" in out
    assert all(summary(d)["started"] == summary(runs(root)[n])["started"] for n, d in runs(root).items())


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    root = lab(tmp_path / "lab", plugins=["boom.py"],
               variants={"a": {}, "b": {"model": {"attention": "boom"}}})
    rc, out, err = gptlab(root, "--jobs", "2")
    assert rc == 1, err
    status = {name.split("__")[0] + name[-3:]: summary(d)["status"] for name, d in runs(root).items()}
    assert status == {"a_s0": "completed", "a_s1": "completed", "b_s0": "failed", "b_s1": "failed"}
    assert "2 run(s) failed" in err


def test_a_locked_run_is_left_to_its_owner(tmp_path):
    root = lab(tmp_path / "lab")
    rc, out, err = gptlab(root, "--dry-run")
    assert rc == 0
    hash_a = re.search(r"│ a\s+│ 0\s+│ (\w+)", out)[1]
    locked = root / "results" / "par" / f"a__{hash_a}__s0"
    locked.mkdir(parents=True)
    with open(locked / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, out, err = gptlab(root, "--jobs", "2")
    assert rc == 0, err
    assert "1 run(s) were being trained by another gptlab process" in err
    assert not (locked / "summary.json").exists()
    assert sorted(summary(d)["status"] for n, d in runs(root).items() if d != locked) == ["completed"] * 3


def test_ctrl_c_stops_every_run_resumably(sequential, tmp_path):
    root = lab(tmp_path / "lab", plugins=["hold.py"])
    hold(root, 3)  # each run waits inside its first log step
    proc = gptlab(root, "--jobs", "2", wait=False)
    held(root, proc, runs=2)  # both workers are mid-run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    release(root)
    assert proc.returncode == 130, err
    started = {n: d for n, d in runs(root).items() if (d / "summary.json").is_file()}
    assert len(started) == 2  # the two in flight; the other two never started
    for run_dir in started.values():  # each stopped in the step it was held in
        assert summary(run_dir)["status"] == "interrupted" and summary(run_dir)["error"].endswith("resumable from step 3")
    rc, out, err = gptlab(root, "--jobs", "2")
    assert rc == 0, err
    for name, run_dir in runs(root).items():
        assert rows(run_dir) == rows(runs(sequential)[name]), name
        assert ("resumed_from" in summary(run_dir)) == (name in started)


def test_terminal_progress_has_an_experiment_line_and_etas(tmp_path):
    """The terminal reporter, fed the callbacks a run makes: an experiment line, bars, ETAs."""
    import io

    from rich.console import Console

    from gptlab.cli.progress import make_reporter
    from gptlab.run.experiment import load_experiment
    from gptlab.run.runner import PlannedRun

    path = lab(tmp_path / "lab") / "exp.yaml"
    exp = load_experiment(path)
    plan = [PlannedRun(i, spec, "run", tmp_path / spec.dir_name) for i, spec in enumerate(exp.runs)]
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    reporter = make_reporter(exp, plan, quiet=False, console=console)
    first, second = exp.runs[0], exp.runs[1]
    row = {"step": 3, "train_loss": 5.0, "tokens_per_s": 1000.0}
    with reporter:
        reporter.progress(first, type("S", (), {"step": 3})(), row)  # the first log step: tokens/s pace
        assert reporter.run_eta(first.dir_name, first, time.perf_counter(), row) == pytest.approx(9 * 4 * 32 / 1000)
        assert reporter.experiment_eta() is not None
        reporter.progress(second, type("S", (), {"step": 3})(), {**row, "val_loss": 4.9})
        assert reporter.headline().startswith("par: run 2 of 4 · 0 done · 0 failed · eta ")
        reporter.finish(first, {"status": "completed", "final_val_loss": 4.5, "wall_time_s": 2.0})
        assert reporter.headline().startswith("par: run 2 of 4 · 1 done · 0 failed")
        reporter.progress_bar.refresh()
    text = screen.getvalue()
    assert "par: run" in text and "a s0 completed  val 4.5000" in text and "eta" in text
    quiet = io.StringIO()
    silent = make_reporter(exp, plan, quiet=True, console=Console(file=quiet, force_terminal=True))
    with silent:
        silent.progress(first, type("S", (), {"step": 3})(), row)
    assert quiet.getvalue() == ""
