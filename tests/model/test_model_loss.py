"""The model's own cross-entropy (``model(x, targets=y)``) in float32 reuses the logits' buffer and
is still F.cross_entropy bit for bit: the loss and every parameter's gradient."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gptlab.model.gpt as gpt
from gptlab import GPTModel


def pair(vocab_multiple):
    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                          vocab_multiple=vocab_multiple))
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("vocab_multiple", [None, 64])  # 300 rows, or 320 with 20 padded ones
def test_the_reusing_loss_equals_f_cross_entropy_bit_for_bit(monkeypatch, vocab_multiple):
    fast, plain = pair(vocab_multiple)
    batch = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(1))
    calls = []
    reusing = gpt._ReusingCrossEntropy.apply
    monkeypatch.setattr(gpt._ReusingCrossEntropy, "apply", lambda *a: calls.append(1) or reusing(*a))
    loss_fast = fast(batch[:, :-1], targets=batch[:, 1:])
    loss_fast.backward()
    monkeypatch.setattr(gpt._ReusingCrossEntropy, "apply", lambda logits, targets: F.cross_entropy(logits, targets))
    loss_plain = plain(batch[:, :-1], targets=batch[:, 1:])
    loss_plain.backward()
    assert calls == [1]  # the reusing path ran
    assert torch.equal(loss_fast, loss_plain)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_evaluation_and_bf16_keep_f_cross_entropy(monkeypatch):
    """Without gradients (evaluation) or with bf16 logits (autocast) the logits are left alone."""
    model, _ = pair(None)
    monkeypatch.setattr(gpt._ReusingCrossEntropy, "apply", lambda *a: pytest.fail("reusing path taken"))
    batch = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        expected = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 300), batch[:, 1:].reshape(-1))
        assert torch.equal(model(batch[:, :-1], targets=batch[:, 1:]), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch[:, :-1], targets=batch[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
