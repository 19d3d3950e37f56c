"""A documents corpus under the ways runs train side by side: ``--jobs 2`` workers and a 2-rank
torchrun read the shards rank 0 (or the parent) prepared once, and train what one process trains."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_subprocess, write_lab

EXP = {"name": "shards", "model": {"preset": "nano", "vocab_size": 257, "n_layers": 1, "context_length": 32},
       "data": {"dataset": {"name": "text", "path": "corpus.txt", "documents": "line"}, "shard_tokens": 4000},
       "train": {"steps": 4, "batch_size": 4, "eval_every": 4, "log_every": 2, "eval_batches": 2},
       "variants": {"a": {}, "b": {"train": {"lr": 0.002}}}, "seeds": [0]}


def lab(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = [f"line {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 5) for i in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    write_lab(root, EXP)
    return root


def rows(root: Path) -> dict:
    out = {}
    for run in sorted((root / "results" / "shards").glob("*__s0")):
        out[run.name] = [(r["step"], r["train_loss"], r.get("val_loss"))
                         for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    root = lab(tmp_path_factory.mktemp("one") / "lab")
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("how", ["jobs", "torchrun"])
def test_side_by_side_runs_read_the_same_shards(one, tmp_path, how):
    root = lab(tmp_path / "lab")
    extra = dict(torchrun=2) if how == "torchrun" else {}
    flags = ("--jobs", "2") if how == "jobs" else ()
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", "--quiet", *flags, cwd=root, **extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours, ref = rows(root), rows(one)
    assert ours.keys() == ref.keys() and len(ours) == 2
    for name in ours:
        for mine, theirs in zip(ours[name], ref[name]):
            assert mine[0] == theirs[0] and mine[1] == pytest.approx(theirs[1], abs=1e-5)
            assert (mine[2] is None) == (theirs[2] is None)
            assert mine[2] is None or mine[2] == pytest.approx(theirs[2], abs=1e-5)
    caches = list((root / "results" / ".cache" / "tokens").iterdir())
    assert len(caches) == 1 and (caches[0] / "manifest.json").is_file()  # prepared once
    assert not list((root / "results").rglob(".*.tmp*"))
