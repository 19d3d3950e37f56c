"""The built-in eval 'hellaswag': the file format it reads, the length-normalised scoring checked
against a per-item loop, a model that knows the right endings scoring 1.0, and the standard error."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab import ConfigError
from gptlab.builtin_plugins.eval_hellaswag import HellaSwag, accuracy_stderr, read_items
from gptlab.builtin_plugins.tokenizer_bytes import ByteTokenizer
from gptlab.plugin.contract import EXPERIMENT_DIR, Eval
from helpers import build

SAMPLE = Path(__file__).resolve().parent / "hellaswag_sample.jsonl"


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


def test_the_sample_is_in_hellaswag_s_own_format_and_every_item_reads():
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert 8 <= len(rows) <= 12
    assert all(len(r["endings"]) == 4 and isinstance(r["label"], int) for r in rows)
    assert any("ctx" not in r for r in rows)  # ctx_a + ctx_b alone must do
    items = read_items(str(SAMPLE))
    assert len(items) == len(rows) and len(read_items(str(SAMPLE), limit=3)) == 3
    no_ctx = next(i for i, r in enumerate(rows) if "ctx" not in r)
    assert items[no_ctx][0] == f"{rows[no_ctx]['ctx_a']} {rows[no_ctx]['ctx_b']}"
    assert [label for _, _, label in items] == [r["label"] for r in rows]


def test_relative_paths_start_at_the_experiment_folder_and_a_missing_file_names_the_key(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.jsonl").write_text(SAMPLE.read_text())
    token = EXPERIMENT_DIR.set(tmp_path)
    try:
        assert len(HellaSwag("data/val.jsonl").items) == 10
        with pytest.raises(ConfigError) as err:
            HellaSwag("data/missing.jsonl")
    finally:
        EXPERIMENT_DIR.reset(token)
    text = str(err.value)
    assert "\n" not in text and "evals.hellaswag.path 'data/missing.jsonl'" in text and "hellaswag_val.jsonl" in text


def test_a_file_in_another_format_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + json.dumps({"ctx": "x", "endings": ["a", "b"],
                                                                          "label": 5}) + "\n")
    with pytest.raises(ConfigError, match="line 2: label must be the index"):
        HellaSwag(str(bad))


def reference_losses(model, tokenizer, items) -> list:
    """One forward per (item, ending): the mean loss of the ending's tokens after the context."""
    out = []
    for ctx, endings, _ in items:
        context = tokenizer.encode(ctx)
        per_ending = []
        for ending in endings:
            tail = tokenizer.encode(" " + ending.strip())
            ids = torch.tensor([context + tail])
            logits = model(ids[:, :-1])
            losses = F.cross_entropy(logits[0], ids[0, 1:], reduction="none")
            per_ending.append(float(losses[len(context) - 1:].mean()))
        out.append(per_ending)
    return out


@torch.no_grad()
def test_accuracy_equals_a_per_item_loop_with_any_batch_size(tokenizer):
    model = build(vocab_size=257, context_length=256).eval()
    reference = reference_losses(model, tokenizer, read_items(str(SAMPLE)))
    expected = sum(min(range(4), key=r.__getitem__) == label
                   for r, (_, _, label) in zip(reference, read_items(str(SAMPLE)))) / len(reference)
    for batch_size in (1, 5, 64):
        ev = HellaSwag(str(SAMPLE), batch_size=batch_size)
        assert isinstance(ev, Eval)
        got = ev.ending_losses(model, tokenizer, torch.device("cpu"), nullcontext)
        assert torch.allclose(torch.tensor(got), torch.tensor(reference), atol=1e-5)
        metrics = ev(model, tokenizer, torch.device("cpu"), nullcontext)
        assert metrics["acc"] == expected
        assert metrics["acc_stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / 10))


@torch.no_grad()
def test_long_items_keep_their_last_context_length_tokens(tokenizer):
    model = build(vocab_size=257, context_length=16).eval()  # shorter than every item
    ev = HellaSwag(str(SAMPLE), limit=2)
    got = ev.ending_losses(model, tokenizer, torch.device("cpu"), nullcontext)
    for (ctx, endings, _), losses in zip(ev.items, got):
        for ending, loss in zip(endings, losses):
            context, tail = tokenizer.encode(ctx), tokenizer.encode(" " + ending.strip())
            ids = torch.tensor([(context + tail)[-17:]])
            scored = min(len(tail), 16)
            want = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")[-scored:].mean()
            assert loss == pytest.approx(float(want), abs=1e-5)


class Knows(torch.nn.Module):
    """A model that has memorised the right completions: at each position it puts its logit mass on
    the byte that continues some right text (context + right ending) from the prefix so far."""

    def __init__(self, texts: list, vocab: int = 257):
        super().__init__()
        self.next = {}
        for ids in texts:
            for t in range(1, len(ids)):
                self.next.setdefault(tuple(ids[:t]), ids[t])
        self.vocab = vocab

    def forward(self, idx):
        logits = torch.zeros((*idx.shape, self.vocab))
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                hit = self.next.get(tuple(row[:t + 1]))
                if hit is not None:
                    logits[b, t, hit] = 20.0
        return logits


def test_a_model_that_knows_the_right_endings_scores_one(tokenizer):
    items = read_items(str(SAMPLE))
    texts = [tokenizer.encode(ctx) + tokenizer.encode(" " + endings[label].strip()) for ctx, endings, label in items]
    metrics = HellaSwag(str(SAMPLE), batch_size=7)(Knows(texts), tokenizer, torch.device("cpu"), nullcontext)
    assert metrics == {"acc": 1.0, "acc_stderr": 0.0}
    # and one that knows the wrong ones (each item's next ending) scores 0
    wrong = [tokenizer.encode(ctx) + tokenizer.encode(" " + endings[(label + 1) % 4].strip())
             for ctx, endings, label in items]
    assert HellaSwag(str(SAMPLE))(Knows(wrong), tokenizer, torch.device("cpu"), nullcontext)["acc"] == 0.0


def test_the_standard_error_of_an_accuracy():
    assert accuracy_stderr(0.25, 100) == pytest.approx(math.sqrt(0.25 * 0.75 / 100))
    assert accuracy_stderr(0.5, 10_042) == pytest.approx(0.0049894, abs=1e-6)
    assert accuracy_stderr(1.0, 8) == 0.0 and accuracy_stderr(0.0, 8) == 0.0
