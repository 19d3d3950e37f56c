"""Long runs resume: a run killed at a random step and rerun ends exactly like one never stopped.

Every run here is a real ``python -m gptlab run`` subprocess on one CPU thread, with dropout on
(so the random streams matter) and a resumable state every 5 steps. A tiny plugin (helpers.HOLD_PLUGIN)
holds the run at the log step the test picks until the signal arrives; it changes no number.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import HOLD_PLUGIN, held, hold, release, run_subprocess, write_lab

STEPS = 40
EXPERIMENT = {
    "name": "long",
    "plugins": ["hold.py"],
    "model": {"preset": "nano", "n_layers": 2, "context_length": 32, "drop_rate": 0.1},
    "train": {"steps": STEPS, "batch_size": 4, "log_every": 3, "eval_every": 10, "eval_batches": 1,
              "checkpoint_every": 5, "checkpoint_keep": 2, "checkpoint": True, "warmup_steps": 4},
    "seeds": [0],
}
#: the training recipe other than the default that the kill-and-resume test repeats: Muon (its
#: momentum warming up across the kill), a WSD schedule whose decay starts mid-run, and a group with
#: its own rate, logged per group
RECIPE = {"optimizer": {"name": "muon", "momentum_warmup": 12, "adamw_lr": 0.002}, "lr": 0.02,
          "schedule": {"name": "wsd", "decay_fraction": 0.4}, "param_groups": {"embeddings": {"lr_mult": 0.5}}}


def start(root: Path, *extra: str) -> subprocess.Popen:
    return run_subprocess("run", "exp.yaml", "--device", "cpu", *extra, cwd=root, wait=False)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def lab(path: Path, recipe: dict = {}) -> Path:
    experiment = {**EXPERIMENT, "train": {**EXPERIMENT["train"], **recipe}}
    return write_lab(path, experiment, plugins={"hold.py": HOLD_PLUGIN}).parent


def run_dir(root: Path) -> Path:
    (found,) = (root / "results" / "long").glob("*__s0")
    return found


def rows(root: Path) -> list[dict]:
    """Every metrics row without its timings (tokens/s and time_s are what a resume may change)."""
    lines = (run_dir(root) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "time_s")} for line in lines]


def last_step(root: Path) -> int:
    try:
        return max((r["step"] for r in rows(root)), default=0)
    except (ValueError, FileNotFoundError):
        return 0


def kill_at(root: Path, step: int, sig: int) -> tuple[int, str]:
    """Start the run, send ``sig`` while it is held inside its first log step at or after ``step``
    and wait for it to end; the next run is not held. Returns (exit status, output)."""
    hold(root, step)
    proc = start(root)
    held(root, proc)
    proc.send_signal(sig)
    try:
        return finish(proc)
    finally:
        release(root)


def held_step(step: int) -> int:
    """The log step a run held at ``step`` stops in: the first step at or after it that logs (every
    log_every steps, every eval_every steps and the last)."""
    train = EXPERIMENT["train"]
    return next(s for s in range(step, STEPS + 1)
                if not (s % train["log_every"] and s % train["eval_every"] and s != STEPS))


def states_before(step: int) -> list[str]:
    """The resumable states a run killed inside (the log of) ``step`` leaves: one every 5 steps
    before it, the newest 2 kept."""
    return [f"step_{s:08d}" for s in range(5, step, 5)][-2:]


def rerun_resumes(root: Path, reference: Path, resumed_from: list, *extra: str) -> None:
    """Run the same command again: it must resume from ``resumed_from`` and end like ``reference``."""
    rc, out = finish(start(root, *extra))
    assert rc == 0, out
    assert json.loads((run_dir(root) / "summary.json").read_text()).get("resumed_from") == resumed_from, out
    assert_same_run(reference, root)


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(b) == rows(a)  # every logged step once, with the same numbers
    assert [r["step"] for r in rows(b)] == sorted({r["step"] for r in rows(b)})
    wa, wb = load_file(run_dir(a) / "model.safetensors"), load_file(run_dir(b) / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((run_dir(r) / "summary.json").read_text()) for r in (a, b))
    for key in ("final_train_loss", "final_val_loss", "best_val_loss", "best_val_step", "tokens", "init_grad_norms"):
        assert sa[key] == sb[key], key
    assert sb["status"] == "completed" and not (run_dir(b) / "resume").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = lab(tmp_path_factory.mktemp("ref") / "lab")
    rc, out = finish(start(root))
    assert rc == 0, out
    return root


@pytest.fixture(scope="module")
def reference_recipe(tmp_path_factory) -> Path:
    root = lab(tmp_path_factory.mktemp("ref_recipe") / "lab", RECIPE)
    rc, out = finish(start(root))
    assert rc == 0, out
    return root


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    kill_and_resume(reference, tmp_path)


def test_a_muon_wsd_run_killed_at_a_random_step_resumes_bit_for_bit(reference_recipe, tmp_path):
    first = rows(reference_recipe)
    assert {"lr/embeddings.adamw", "lr/decay.muon", "lr/no_decay.adamw"} <= set(first[0])  # each group's rate
    stable = [r for r in first if 4 < r["step"] <= STEPS * 0.6]  # past warmup, before the decay
    assert stable and all(r["lr"] == 0.02 and r["lr/embeddings.adamw"] == 0.001 for r in stable)
    assert first[-1]["step"] == STEPS and first[-1]["lr"] == 0.0  # WSD decays to 0 at the last step
    kill_and_resume(reference_recipe, tmp_path, RECIPE)


def kill_and_resume(reference: Path, tmp_path: Path, recipe: dict = {}) -> None:
    target = random.Random().randrange(6, STEPS - 6)
    root = lab(tmp_path / "lab", recipe)
    kill_at(root, target, signal.SIGKILL)
    summary = json.loads((run_dir(root) / "summary.json").read_text())
    states = sorted(p.name for p in (run_dir(root) / "resume").iterdir())
    killed = held_step(target)
    assert (summary["status"], states, last_step(root)) == ("running", states_before(killed), killed), target
    rerun_resumes(root, reference, [int(states[-1].split("_")[1])])


def test_ctrl_c_saves_at_the_step_it_arrives_and_exits_130(reference, tmp_path):
    root = lab(tmp_path / "lab")
    rc, out = kill_at(root, 7, signal.SIGINT)
    assert rc == 130, out
    summary = json.loads((run_dir(root) / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "resumable from step" in summary["error"]
    step = int(summary["error"].rsplit(" ", 1)[1])
    assert step == held_step(7) and f"step_{step:08d}" in os.listdir(run_dir(root) / "resume")
    rerun_resumes(root, reference, [step])


def test_a_damaged_newest_state_falls_back_to_the_one_before(reference, tmp_path):
    root = lab(tmp_path / "lab")
    kill_at(root, 16, signal.SIGKILL)
    states = sorted((run_dir(root) / "resume").iterdir())
    assert [state.name for state in states] == states_before(held_step(16))
    newest = states[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + b"\0" * 8)  # same size, wrong bytes
    (run_dir(root) / "resume" / ".step_00000099.tmp1").mkdir()  # a write a kill cut short
    rc, out = finish(start(root))
    assert rc == 0, out
    assert "damaged resumable state ignored" in out and states[-1].name in out
    older = int(states[0].name.split("_")[1])
    assert json.loads((run_dir(root) / "summary.json").read_text())["resumed_from"] == [older]
    assert_same_run(reference, root)  # the warning is in this run's output, so it is not rerun_resumes


def test_restart_starts_an_unfinished_run_over(reference, tmp_path):
    root = lab(tmp_path / "lab")
    kill_at(root, 12, signal.SIGKILL)
    rerun_resumes(root, reference, None, "--restart")
    shutil.rmtree(root)
