"""gptlab show and gptlab generate, on one tiny trained run and on hand-written run directories."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from gptlab.cli import build_parser
from gptlab.errors import ConfigError

from helpers import imported_modules, make_experiment, run_cli, run_subprocess

TINY_YAML = """\
name: tiny
model: {preset: nano}
train: {steps: 10, batch_size: 4, eval_every: 5, log_every: 5, eval_batches: 1, checkpoint: true}
variants: {small: {}}
seeds: [0]
"""


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_cmd(argv: list[str]) -> int:
    args = parse(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One nano-preset run of 10 steps with a checkpoint (a few seconds on CPU)."""
    root = tmp_path_factory.mktemp("trained")
    (root / "tiny.yaml").write_text(TINY_YAML)
    assert run_cli(None, "run", root / "tiny.yaml", "--results-dir", root / "res", "--device", "cpu")[0] == 0
    (run,) = [p for p in (root / "res" / "tiny").iterdir() if p.is_dir()]
    return run


@pytest.fixture(autouse=True)
def columns_80(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def test_show_run(trained_run, capsys):
    assert run_cmd(["show", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "tiny / small / seed 0" in out and "completed" in out
    assert "model.n_layers=2" in out and "final val" in out
    assert "Legend:" in out and "⠤o⠤ train" in out and "⠤x⠤ val" in out
    assert any(ch in out for ch in "⠁⠂⠄⡀⠈⠐⠠⢀")  # braille dots of the curves
    assert max(len(line) for line in out.splitlines()) <= 80


def test_show_marks_keys_that_differ_from_the_base(tmp_path, capsys):
    exp = make_experiment(tmp_path, "e", {"pre": [1.0], "post": [1.1]}, post={"model": {"norm_placement": "post"}})
    assert run_cmd(["show", str(exp / "post__hpost__s0")]) == 0
    out = capsys.readouterr().out
    assert "differs from base: model.norm_placement=post" in out and "* model.norm_placement=post" in out
    assert "* model.n_layers" not in out


def test_show_experiment_overlays_variants(tmp_path, capsys):
    exp = make_experiment(tmp_path, "e", {"pre_ln": [1.0, 1.1], "post_ln": [1.3, 1.2]})
    assert run_cmd(["show", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "validation loss, mean of seeds" in out and "training loss, mean of seeds" in out
    assert "⠤o⠤ pre_ln (n=2)" in out and "⠤x⠤ post_ln (n=2)" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    with pytest.raises(ConfigError, match="does not exist"):
        run_cmd(["show", str(tmp_path / "nope")])


def test_show_experiment_does_not_import_torch(tmp_path):
    exp = make_experiment(tmp_path, "e", {"pre_ln": [1.0, 1.1], "post_ln": [1.3, 1.2]})
    proc = run_subprocess("show", exp, flags=("-X", "importtime"), env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss, mean of seeds" in proc.stdout
    imported = imported_modules(proc.stderr)
    assert "gptlab.results.compare" in imported and [m for m in imported if m.split(".")[0] == "torch"] == []


def test_generate_greedy_is_deterministic(trained_run, capsys):
    argv = ["generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0",
            "--device", "cpu"]
    assert run_cmd(argv) == 0
    first = capsys.readouterr().out
    assert run_cmd(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("def ")
    sampled = argv[:-4] + ["--top-k", "5", "--top-p", "0.9", "--seed", "3", "--device", "cpu"]
    assert run_cmd(sampled) == 0
    once = capsys.readouterr().out
    assert run_cmd(sampled) == 0
    assert capsys.readouterr().out == once and once.startswith("def ")  # same seed, same sample


def test_generate_without_checkpoint_says_how_to_get_one(trained_run, tmp_path):
    copy = tmp_path / trained_run.name
    shutil.copytree(trained_run, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="train.checkpoint=true"):
        run_cmd(["generate", str(copy), "--prompt", "x"])
    with pytest.raises(ConfigError, match="temperature"):
        run_cmd(["generate", str(trained_run), "--prompt", "x", "--temperature", "-1"])
    assert json.loads((trained_run / "tokenizer.json").read_text())["vocab_size"] == 256
