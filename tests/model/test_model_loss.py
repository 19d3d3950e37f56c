"""The model's own float32 cross-entropy (``model(x, targets=y)``) never allocates a second
logits-sized tensor, and its loss and every parameter's gradient equal F.cross_entropy's (after
the model's logits) to float tolerance. Two paths:

- blockwise (training on the CPU): the head and the loss a block of rows at a time, so no
  logits-sized tensor exists at all;
- reusing (float32 elsewhere, a soft-capped or hooked head): the log-probabilities and then their
  gradient are written over the head's output.

The blockwise path makes the gradient with F.cross_entropy's own kernels (bit for bit when the rows
fit one block); the reusing path writes softmax - onehot with ATen's softmax kernel, whose exp rounds
differently in the last bit. Both are checked at torch.testing.assert_close's float32 tolerances."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gptlab.model.gpt as gpt
from gptlab import GPTModel

VOCAB = 300
PATHS = {"blockwise": gpt._BlockwiseHeadCrossEntropy, "reusing": gpt._ReusingCrossEntropy}


def pair(vocab_multiple, **extra):
    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=VOCAB, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                          vocab_multiple=vocab_multiple, **extra))
    return model, copy.deepcopy(model)


def plain_loss(model, x, y):
    """The reference: F.cross_entropy after the model's logits (over the real vocabulary)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batch(seed=1, rows=3, length=32):
    data = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:].clone()  # 3 x 31 = 93 positions


def take(path, model):
    """Steer ``model`` onto ``path``: a (no-op) hook on the head rules out the blockwise one."""
    if path == "reusing":
        model.head.register_forward_hook(lambda module, inputs, out: None)


def count_calls(monkeypatch):
    calls = []
    for name, fn in PATHS.items():
        monkeypatch.setattr(fn, "apply", (lambda name, apply: lambda *a: calls.append(name) or apply(*a))(
            name, fn.apply))
    return calls


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(gpt, "BLOCK_BYTES", 1)  # 16-row blocks: 93 positions make 6, the last one of 13


@pytest.mark.parametrize("ignored", [False, True])  # targets of -100: F.cross_entropy's ignore_index
@pytest.mark.parametrize("vocab_multiple", [None, 64])  # 300 rows, or 320 with 20 padded ones
@pytest.mark.parametrize("path", list(PATHS))
def test_the_loss_equals_f_cross_entropy(monkeypatch, small_blocks, path, vocab_multiple, ignored):
    fast, plain = pair(vocab_multiple)
    take(path, fast)
    x, y = batch()
    if ignored:
        y[0, :7] = -100
        y[2, -3:] = -100
    calls = count_calls(monkeypatch)
    loss_fast = fast(x, targets=y)
    (2.5 * loss_fast).backward()  # an upstream gradient other than 1 (grad accumulation scales it)
    monkeypatch.undo()
    loss_plain = plain_loss(plain, x, y)
    (2.5 * loss_plain).backward()
    assert calls == [path]
    torch.testing.assert_close(loss_fast, loss_plain)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    if vocab_multiple:  # the padded rows of the (tied) head get no gradient at all
        assert fast.head.weight.shape[0] == 320
        assert torch.count_nonzero(fast.head.weight.grad[VOCAB:]) == 0


def test_blockwise_with_a_frozen_head_or_frozen_body(small_blocks):
    """Only the gradients asked for are computed, and they are still F.cross_entropy's."""
    for frozen in ("head", "body"):
        fast, plain = pair(64)
        for model in (fast, plain):
            for name, p in model.named_parameters():
                p.requires_grad_((name == "tok_emb.weight") == (frozen == "body"))  # tok_emb is the tied head
        x, y = batch()
        fast(x, targets=y).backward()
        plain_loss(plain, x, y).backward()
        for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("path", list(PATHS))
def test_ignored_rows_get_no_gradient(small_blocks, path):
    """A position whose target is ignored sends no gradient into the head (checked at its input);
    padded columns of the logits none either (reusing path, where the logits exist)."""
    model, _ = pair(64)
    take(path, model)
    x, y = batch()
    y[1] = -100
    seen = {}

    def keep_grad(name):
        def hook(module, inputs, out):
            out.register_hook(lambda g: seen.setdefault(name, g.clone()))
        return hook

    model.final_norm.register_forward_hook(keep_grad("hidden"))
    if path == "reusing":
        model.head.register_forward_hook(keep_grad("logits"))
    model(x, targets=y).backward()
    assert torch.count_nonzero(seen["hidden"][1]) == 0
    assert torch.count_nonzero(seen["hidden"][0]) > 0
    if path == "reusing":
        grad = seen["logits"]
        assert torch.count_nonzero(grad[1]) == 0
        assert torch.count_nonzero(grad[:, :, VOCAB:]) == 0
        rows = grad.reshape(-1, grad.shape[-1]).sum(-1)  # softmax - onehot sums to 0 in every row
        torch.testing.assert_close(rows, torch.zeros_like(rows))


class LogitsSized(TorchDispatchMode):
    """Records the storage of every op output with at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.storages = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.storages.append((str(func), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("vocab_multiple", [None, 64])
def test_no_second_logits_sized_buffer(small_blocks, vocab_multiple):
    """Forward and backward together: the blockwise path creates no logits-sized tensor at all; the
    reusing path one, the head's output, in which the log-probabilities and the gradient then live.
    (The counter itself is checked against F.cross_entropy, which allocates several.)"""
    x, y = batch()
    fast, plain = pair(vocab_multiple)
    numel = x.numel() * fast.head.weight.shape[0]
    with LogitsSized(numel) as mode:
        fast(x, targets=y).backward()
    assert mode.storages == []
    take("reusing", fast)
    with LogitsSized(numel) as mode:
        fast(x, targets=y).backward()
    assert len(mode.storages) >= 3  # the head's output, the log-softmax, the gradient ...
    assert len({ptr for _, ptr in mode.storages}) == 1, mode.storages  # ... all in one buffer
    with LogitsSized(x.numel() * VOCAB) as mode:
        plain_loss(plain, x, y).backward()
    assert len({ptr for _, ptr in mode.storages}) > 1


def test_soft_capped_logits_take_the_reusing_path(monkeypatch):
    fast, plain = pair(None, logit_softcap=30.0)
    x, y = batch()
    calls = count_calls(monkeypatch)
    fast(x, targets=y).backward()
    monkeypatch.undo()
    plain_loss(plain, x, y).backward()
    assert calls == ["reusing"]
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_evaluation_and_bf16_keep_f_cross_entropy(monkeypatch):
    """Without gradients (evaluation) or with bf16 logits (autocast) the logits are left alone."""
    model, _ = pair(None)
    for fn in PATHS.values():
        monkeypatch.setattr(fn, "apply", lambda *a: pytest.fail("own loss path taken"))
    batch = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        expected = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 300), batch[:, 1:].reshape(-1))
        assert torch.equal(model(batch[:, :-1], targets=batch[:, 1:]), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch[:, :-1], targets=batch[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32


@pytest.mark.parametrize("vocab_multiple", [None, 64])
def test_blockwise_in_one_block_is_f_cross_entropy_bit_for_bit(monkeypatch, vocab_multiple):
    """With all rows in one block and an incoming gradient that is a power of two, the blockwise
    path's loss and gradients are F.cross_entropy's exactly: the same kernels in the same order."""
    fast, plain = pair(vocab_multiple)
    x, y = batch()
    calls = count_calls(monkeypatch)
    (0.5 * fast(x, targets=y)).backward()
    monkeypatch.undo()
    (0.5 * plain_loss(plain, x, y)).backward()
    assert calls == ["blockwise"]
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert torch.equal(fast(x, targets=y).detach(), plain_loss(plain, x, y).detach())
