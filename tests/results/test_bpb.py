"""Bits per byte: a unit that survives a tokenizer change. Every evaluation logs ``val_bpb`` (the
summed validation loss in bits over the UTF-8 bytes of the same targets); tables refuse to compare
``val_loss`` across tokenizers and point to ``--metric val_bpb``."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import gptlab
from gptlab import GPTModel
from gptlab.config.run import DataConfig
from gptlab.config.model import ComponentSpec
from gptlab.data.tokens import eval_starts, prepare_tokens, windows
from gptlab.train.loop import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpb")
    exp = {"name": "units", "model": {"preset": "nano", "n_layers": 2, "emb_dim": 32, "n_heads": 4,
                                      "vocab_size": 512},
           "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "log_every": 3},
           "variants": {"bytes": {"data": {"tokenizer": "bytes"}}, "char": {"data": {"tokenizer": "char"}}},
           "seeds": [0]}
    (root / "exp.yaml").write_text(yaml.safe_dump(exp))
    proc = subprocess.run([sys.executable, "-m", "gptlab", "run", "exp.yaml", "--device", "cpu"], cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "comparison table skipped: these runs use different tokenizers (bytes, char)" in " ".join(proc.stderr.split())
    return root


def rows(root, variant):
    (run_dir,) = (root / "results" / "units").glob(f"{variant}__*__s0")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads((run_dir / "summary.json").read_text())


def test_with_one_byte_per_token_bits_per_byte_is_the_loss_in_bits(lab):
    metrics, summary = rows(lab, "bytes")
    evaluated = [r for r in metrics if "val_loss" in r]
    assert len(evaluated) == 2
    for r in evaluated:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)
    assert summary["final_val_bpb"] == evaluated[-1]["val_bpb"]


def test_bits_per_byte_divides_the_summed_bits_by_the_targets_utf8_bytes(tmp_path):
    plugins = gptlab.default_plugins()
    corpus = tmp_path / "corpus.txt"  # characters of one, two and three bytes
    corpus.write_text("".join(f"line {i}: naïve café, 日本語 and plain words\n" for i in range(400)))
    spec = DataConfig(dataset=ComponentSpec("text", {"path": str(corpus)}), tokenizer=ComponentSpec("char"))
    data = prepare_tokens(spec, plugins, tmp_path / "cache", write=False)
    torch.manual_seed(0)
    model = GPTModel({**gptlab.PRESETS["nano"], "n_layers": 1, "emb_dim": 32, "n_heads": 4, "vocab_size": 512})
    counts = torch.tensor(data.tokenizer.token_bytes(list(range(data.tokenizer.vocab_size))))
    extra: dict = {}
    loss = evaluate(model, data.val, 64, 2, 4, CPU, contextlib.nullcontext, counts, extra)
    starts = eval_starts(len(data.val), 64, 8)
    _, targets = windows(data.val, starts, 64, CPU)
    text_bytes = sum(len(data.tokenizer.decode([int(t)]).encode("utf-8")) for t in targets.reshape(-1))
    assert text_bytes > targets.numel()  # the corpus has characters of more than one byte
    assert extra["val_bpb"] == pytest.approx(loss * targets.numel() / math.log(2) / text_bytes, rel=1e-9)


def test_tables_refuse_val_loss_across_tokenizers_and_compare_bits_per_byte(lab):
    env = dict(os.environ, COLUMNS="200")
    refused = subprocess.run([sys.executable, "-m", "gptlab", "compare", "results/units"], cwd=lab, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "gptlab: error: these runs use different tokenizers (bytes, char), so a unit of val_loss differs between "
        "them; compare --metric val_bpb (bits per byte of the same text)"]
    shown = subprocess.run([sys.executable, "-m", "gptlab", "compare", "results/units", "--metric", "val_bpb"],
                           cwd=lab, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    bpb = {v: rows(lab, v)[1]["final_val_bpb"] for v in ("bytes", "char")}
    assert f"{bpb['bytes']:.4f}" in shown.stdout and f"{bpb['char']:.4f}" in shown.stdout
