"""One run on two processes: ``torchrun --nproc_per_node 2 -m gptlab run`` with gloo on CPU.

The two ranks together train on exactly the batch one process would (each on its half), so the
loss curve equals the single-process run's: every logged train and val loss within 1e-5
(absolute; the gradient all-reduce sums in another order). Only rank 0 writes, one copy of each
run; a rank that dies fails the job cleanly.
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

import gptlab.rundir as rd

from helpers import HOLD_PLUGIN, held, hold, release, run_subprocess, write_lab

EXP = {
    "name": "ddp",
    "model": {"preset": "nano", "n_layers": 1, "context_length": 32, "drop_rate": 0.0},
    "train": {"steps": 8, "batch_size": 4, "grad_accum": 2, "eval_every": 4, "log_every": 2, "eval_batches": 1,
              "checkpoint_every": 4},
    # c: Muon orthogonalises the gradient after the all-reduce, so each rank takes the same step
    "variants": {"a": {}, "b": {"model": {"norm": "rmsnorm"}},
                 "c": {"train": {"optimizer": {"name": "muon", "momentum_warmup": 4}, "lr": 0.02,
                                 "schedule": "wsd"}},
                 # d: a per-layer layout whose second layer is an MoE balanced by the bias update, which
                 # sums the expert load over ranks, and a windowed attention in the first
                 "d": {"model": {"n_layers": 2, "layers": [
                     {"at": 0, "attention": {"name": "sdpa", "window": 8}},
                     {"at": 1, "activation": {"name": "moe", "n_experts": 4, "top_k": 2, "balance": "bias",
                                              "bias_rate": 0.01}}]}}},
    "seeds": [0],
}
DIES = '''
import os

import gptlab
from torch import nn


class Fragile(nn.LayerNorm):
    """A LayerNorm whose process dies on its 6th forward on rank 1 (a lost node, an OOM kill)."""

    calls = 0

    def forward(self, x):
        Fragile.calls += 1
        if os.environ.get("RANK") == "1" and Fragile.calls == 6:
            os._exit(1)
        return super().forward(x)


def fragile(cfg, dim):
    """LayerNorm that kills rank 1."""
    return Fragile(dim)


@gptlab.hookimpl
def gptlab_register(register):
    register("norm", "fragile", fragile)
'''


def single(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_subprocess("run", "exp.yaml", "--device", "cpu", *extra, cwd=root)


def torchrun(root: Path, *extra: str, wait: bool = True):
    return run_subprocess("run", "exp.yaml", "--device", "cpu", *extra, cwd=root, torchrun=2, wait=wait)


def lab(root: Path, **changes) -> Path:
    return write_lab(root, {**EXP, **changes}, plugins={"dies.py": DIES, "hold.py": HOLD_PLUGIN}).parent


def curves(root: Path) -> dict[str, list]:
    out = {}
    for run in sorted((root / "results" / "ddp").glob("*__s0")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[run.name] = [(r["step"], r["tokens"], r["train_loss"], r.get("val_loss")) for r in rows]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = lab(tmp_path_factory.mktemp("one") / "lab")
    proc = single(root)
    assert proc.returncode == 0, proc.stderr
    return root


def test_two_processes_equal_one_with_the_same_global_batch(reference, tmp_path):
    root = lab(tmp_path / "lab")
    proc = torchrun(root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours, theirs = curves(root), curves(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 4  # one copy of each run
    for name in ours:
        assert [r[:2] for r in ours[name]] == [r[:2] for r in theirs[name]]  # same steps, same global tokens
        for mine, ref in zip(ours[name], theirs[name]):
            assert mine[2] == pytest.approx(ref[2], abs=1e-5) and (mine[3] is None) == (ref[3] is None)
            assert mine[3] is None or mine[3] == pytest.approx(ref[3], abs=1e-5)
        summary = rd.read_summary(root / "results" / "ddp" / name)
        assert summary["status"] == "completed" and summary["world_size"] == 2
        assert summary["tokens"] == rd.read_summary(reference / "results" / "ddp" / name)["tokens"]
    assert not list((root / "results" / "ddp").glob("*/resume"))  # states removed once finished
    assert proc.stdout.count("Δ vs a") == 1  # the table, printed by rank 0 alone


def test_an_odd_batch_is_refused_before_training(tmp_path):
    root = lab(tmp_path / "lab")
    proc = torchrun(root, "train.batch_size=3")
    assert proc.returncode != 0
    assert "train.batch_size 3 is not divisible by the 2 processes" in proc.stderr
    assert not (root / "results" / "ddp").exists()


def test_a_rank_that_dies_fails_the_job_cleanly(tmp_path):
    root = lab(tmp_path / "lab", plugins=["dies.py"], variants={"a": {"model": {"norm": "fragile"}}})
    proc = torchrun(root)
    assert proc.returncode != 0
    (run,) = (root / "results" / "ddp").glob("a__*__s0")
    status = rd.run_status(run, rd.read_summary(run))
    # rank 0's next collective fails at once (gloo: the peer's connection is gone), before
    # torchrun's SIGTERM could matter (a stop is only acted on at the end of a step, by a
    # collective that fails the same way): the run is recorded as failed, with that error
    summary = rd.read_summary(run)
    assert status == rd.FAILED, summary
    assert summary["error"].startswith("RuntimeError: ") and "peer" in summary["error"], summary["error"]
    assert not rd.lock_held(run)


def test_compile_and_gradient_checkpointing_work_under_ddp(tmp_path):
    root = lab(tmp_path / "lab", variants={"a": {}})
    proc = torchrun(root, "train.compile=true", "model.gradient_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (root / "results" / "ddp").glob("a__*__s0")
    summary = rd.read_summary(run)
    assert summary["status"] == "completed" and summary["compile"].startswith("compiled")
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_an_interrupted_ddp_run_resumes_on_every_rank(reference, tmp_path):
    root = lab(tmp_path / "lab", plugins=["hold.py"], variants={"a": {}},
               train={**EXP["train"], "checkpoint_every": 2})
    hold(root, 4)  # past step 4, inside its log
    proc = torchrun(root, wait=False)
    held(root, proc)
    proc.send_signal(signal.SIGINT)  # torchrun passes a stop on to every rank
    proc.communicate(timeout=300)
    release(root)
    (run,) = (root / "results" / "ddp").glob("a__*__s0")
    summary = rd.read_summary(run)
    assert summary["status"] == "interrupted" and "resumable from step" in summary["error"], summary
    step = int(summary["error"].rsplit(" ", 1)[1])
    done = torchrun(root)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = rd.read_summary(run)
    assert summary["status"] == "completed" and summary["resumed_from"] == [step]
    mine, ref = curves(root)[run.name], curves(reference)[run.name]
    assert [r[:2] for r in mine] == [r[:2] for r in ref]
    assert all(m[2] == pytest.approx(r[2], abs=1e-5) for m, r in zip(mine, ref))
