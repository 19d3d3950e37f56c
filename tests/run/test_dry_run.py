"""``gptlab run --dry-run`` rejects exactly what the real run rejects, with the same message.

Each bad input goes through both commands; both must exit 2 with one identical line and leave no
experiment folder behind. Good inputs pass the dry run, and a warning (warmup longer than the
run) is printed by both.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import pre_vs_post, run_cli, write_lab

TINY = {**pre_vs_post(steps=2, batch_size=2, eval_every=2, log_every=2, eval_batches=1), "compare": {"baseline": "a"}}

REJECTED = {
    "unknown-dataset": ["data.dataset=wikitext"],
    "seq-len-over-context": ["train.seq_len=128"],
    "unknown-attention": ["model.attention=vanila"],
    "bad-option-value": ["model.position={name: rope, base: abc}"],
    "missing-text-files": ["data.dataset={name: text, path: /nonexistent/*.txt}"],
    "baseline-typo": ["compare.baseline=aa"],
    "metric-typo": ["compare.metric=val_los"],
    "by-typo": ["compare.by=model.positon"],
    "heads-do-not-divide": ["model.n_heads=3"],
    "unwritable-results-dir": ["--results-dir", "/proc/forbidden/results"],
}
MESSAGE = {
    "unknown-dataset": "unknown dataset 'wikitext'",
    "seq-len-over-context": "train.seq_len 128 exceeds model.context_length 32",
    "unknown-attention": "did you mean 'vanilla'",
    "bad-option-value": "option base must be a number > 0, got 'abc'",
    "missing-text-files": "matches no file",
    "baseline-typo": "compare.baseline 'aa' is not a row",
    "metric-typo": "did you mean 'val_loss'",
    "by-typo": "compare.by 'model.positon' is not a config key",
    "heads-do-not-divide": "divisible",
    "unwritable-results-dir": "cannot be created",
}


@pytest.fixture
def exp(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("COLUMNS", "200")
    return write_lab(tmp_path, TINY, "tiny.yaml")


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_dry_run_and_run_reject_the_same_inputs(case, exp, tmp_path, capsys):
    argv = REJECTED[case]
    if "--results-dir" not in argv:
        argv = [*argv, "--results-dir", tmp_path / "results"]
    results = Path(argv[argv.index("--results-dir") + 1])
    dry = run_cli(capsys, "run", exp, *argv, "--dry-run", "--device", "cpu")
    real = run_cli(capsys, "run", exp, *argv, "--device", "cpu")
    assert dry[0] == real[0] == 2
    assert dry[2] == real[2]  # the same one line
    assert dry[2].count("\n") == 1 and MESSAGE[case] in dry[2], dry[2]
    assert not (results / "tiny").exists()


def test_warmup_longer_than_the_run_is_a_warning_in_both(exp, tmp_path, capsys):
    argv = ["run", exp, "train.warmup_steps=5", "--results-dir", tmp_path / "results", "--device", "cpu"]
    rc, out, err = run_cli(capsys, *argv, "--dry-run")
    assert rc == 0
    assert "warning" in err and "train.warmup_steps (5) is not shorter than train.steps (2)" in " ".join(err.split())
    assert "variant 'a'" in err and "variant 'b'" in err
    assert not (tmp_path / "results" / "tiny").exists() and not (tmp_path / "results" / ".cache").exists()
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0 and "train.warmup_steps (5) is not shorter than train.steps (2)" in " ".join(err.split())
    assert len(list((tmp_path / "results" / "tiny").glob("*__s0"))) == 2


def test_a_good_experiment_passes_the_dry_run_and_writes_nothing(exp, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "results", "--dry-run", "--device", "cpu")
    assert rc == 0 and "warning" not in err
    rows = [line.split("│")[1:5] for line in out.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in r] for r in rows] == [["a", "0", r[2].strip(), "run"] for r in rows[:1]] + \
        [["b", "0", rows[1][2].strip(), "run"]]
    assert not (tmp_path / "results").exists()
