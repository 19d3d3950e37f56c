"""The math of the built-in components, checked against closed forms computed independently."""
from __future__ import annotations

import math

import pytest
import torch

from gptlab.plugin.components import PositionalContext
from gptlab.config.model import ModelConfig

from helpers import TINY, build, randomize_, tiny_cfg


def make(system, kind, name, *args, **overrides):
    """Build one registered component the way the model does: factory(cfg, *args, **options)."""
    cfg = ModelConfig.from_any(tiny_cfg(**overrides))
    return system.registry.get(kind, name).factory(cfg, *args)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------

def _rotate_at(rope, pos, q, k):
    ctx = rope.context(pos, 1, q.device, q.dtype)
    assert ctx.rotate is not None and ctx.score_bias is None
    return ctx.rotate(q, k)


def test_rope_scores_depend_only_on_relative_offset(builtin_system):
    rope = make(builtin_system, "position", "rope", emb_dim=32, n_heads=2)  # head_dim 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 1, 16, generator=g)

    def score(m, n):
        qm, _ = _rotate_at(rope, m, q, k)
        _, kn = _rotate_at(rope, n, q, k)
        return (qm * kn).sum().item()

    for m, n in [(3, 1), (7, 7), (2, 9), (0, 5)]:
        base = score(m, n)
        for s in (1, 4, 13, 40):  # 40 goes past context_length 16: the tables grow
            assert score(m + s, n + s) == pytest.approx(base, abs=1e-4), (m, n, s)
    # ... and the offset does matter
    by_offset = [score(9, n) for n in range(10)]
    assert max(by_offset) - min(by_offset) > 0.1
    # position 0 is the identity, and every rotation keeps the norm
    q0, k0 = _rotate_at(rope, 0, q, k)
    torch.testing.assert_close(q0, q)
    torch.testing.assert_close(k0, k)
    q9, _ = _rotate_at(rope, 9, q, k)
    assert q9.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rope_matches_the_closed_form(builtin_system, base):
    """Half-split layout (GPT-NeoX / HF Llama): pair (i, i + D/2) turns by angle p * base^(-2i/D)."""
    D = 8
    cfg = ModelConfig.from_any(tiny_cfg(emb_dim=32, n_heads=4, position={"name": "rope", "base": base}))
    rope = builtin_system.registry.get("position", "rope").factory(cfg, **cfg.position.options)
    x = torch.randn(1, 2, 1, D, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    for p in (0, 1, 5, 23):
        rq, rk = _rotate_at(rope, p, x, 2 * x)
        for h in range(2):
            v = x[0, h, 0].tolist()
            for i in range(D // 2):
                theta = p * base ** (-2 * i / D)
                a, b = v[i], v[i + D // 2]
                assert rq[0, h, 0, i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-5)
                assert rq[0, h, 0, i + D // 2].item() == pytest.approx(b * math.cos(theta) + a * math.sin(theta),
                                                                         abs=1e-5)
        torch.testing.assert_close(rk, 2 * rq)
    # a multi-token context rotates token j by position offset + j
    ctx = rope.context(3, 4, x.device, x.dtype)
    seq = x.expand(1, 2, 4, D).contiguous()
    rq, _ = ctx.rotate(seq, seq)
    for j in range(4):
        single, _ = _rotate_at(rope, 3 + j, x, x)
        torch.testing.assert_close(rq[:, :, j:j + 1], single)


def test_rope_survives_inference_mode_evaluation_at_longer_length():
    """Evaluating at a longer length under torch.inference_mode (e.g. a length-extrapolation eval)
    and then training on must work: the grown cos/sin tables may not be inference tensors."""
    model = build(position="rope")
    long = torch.randint(0, TINY["vocab_size"], (1, 2 * TINY["context_length"]))
    with torch.inference_mode():
        model.eval()
        model(long)
    model.train()
    loss = model(long[:, :TINY["context_length"]]).sum()
    loss.backward()
    assert model.tok_emb.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------

def test_alibi_slopes_and_bias_for_8_heads(builtin_system):
    alibi = make(builtin_system, "position", "alibi", emb_dim=32, n_heads=8)
    expected = torch.tensor([2.0 ** -i for i in range(1, 9)])
    assert torch.equal(alibi.slopes.float(), expected)
    for offset, q_len in [(0, 6), (4, 3)]:
        ctx = alibi.context(offset, q_len, torch.device("cpu"), torch.float32)
        assert ctx.rotate is None
        bias = ctx.score_bias
        assert bias.shape == (8, q_len, offset + q_len)
        for h in range(8):
            for i in range(q_len):
                for j in range(offset + i + 1):  # every key the query may attend
                    assert bias[h, i, j].item() == -expected[h].item() * (offset + i - j)


def test_alibi_slopes_for_a_non_power_of_two(builtin_system):
    """Press et al.'s recipe for 12 heads: the 8-head slopes, then every other 16-head slope."""
    alibi = make(builtin_system, "position", "alibi", emb_dim=48, n_heads=12)
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * (2 * i + 1)) for i in range(4)]
    assert alibi.slopes.tolist() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# sinusoidal
# ---------------------------------------------------------------------------------------------

def test_sinusoidal_table_matches_the_closed_form(builtin_system):
    d = 32
    cfg = ModelConfig.from_any(tiny_cfg(emb_dim=d))
    factory = builtin_system.registry.get("position", "sinusoidal").factory
    sin = factory(cfg, scale=1.0)  # the raw table of Vaswani et al.
    assert sum(p.numel() for p in sin.parameters()) == 0
    zeros = torch.zeros(1, 10, d)
    for offset in (0, 3, 40):  # 40 is past context_length 16: the table grows
        pe = sin.embed(zeros, offset)[0]
        for t in (0, 1, 7, 9):
            p = offset + t
            for i in (0, 1, 5, 15):
                angle = p / 10000 ** (2 * i / d)
                assert pe[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6), (p, i)
                assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6), (p, i)
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(sin.embed(x, 2), x + sin.embed(torch.zeros(1, 5, d), 2))
    # the default scales the table to an RMS of 0.02, the size of GPT-2's token embeddings
    default = factory(cfg)
    raw = sin.embed(torch.zeros(1, 64, d), 0)
    torch.testing.assert_close(default.embed(torch.zeros(1, 64, d), 0), raw * 0.02 * math.sqrt(2))
    assert default.embed(torch.zeros(1, 64, d), 0).pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=0.01)


def test_learned_positions_are_offset_aware(builtin_system):
    learned = make(builtin_system, "position", "learned")
    x = torch.zeros(1, 4, TINY["emb_dim"])
    torch.testing.assert_close(learned.embed(x, 5)[0], learned.emb.weight[5:9])
    assert learned.max_length == TINY["context_length"]


# ---------------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------------

def test_layernorm_matches_formula(builtin_system):
    d, eps = 24, 1e-5
    norm = make(builtin_system, "norm", "layernorm", d)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
        norm.bias.copy_(torch.randn(d, generator=g))
    x = 3 * torch.randn(4, 5, d, generator=g) + 1
    mean = x.sum(-1, keepdim=True) / d
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / d
    expected = (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    # model.bias false: a LayerNorm without a bias
    no_bias = make(builtin_system, "norm", "layernorm", d, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == ["weight"]


def test_rmsnorm_matches_formula(builtin_system):
    d, eps = 24, 1e-5
    norm = make(builtin_system, "norm", "rmsnorm", d)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    x = 3 * torch.randn(4, 5, d, generator=g) + 1
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / d + eps) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_norm_eps_option_reaches_the_module():
    model = build(norm={"name": "rmsnorm", "eps": 1e-3})
    assert model.final_norm.eps == 1e-3
    assert model.blocks[0].norm1.eps == 1e-3


# ---------------------------------------------------------------------------------------------
# MLPs and activations
# ---------------------------------------------------------------------------------------------

GATED = ("swiglu", "geglu", "reglu")
UNGATED = ("gelu", "gelu_tanh", "relu", "relu2", "silu")


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_gated_mlps_are_parameter_matched(builtin_system):
    d = 48
    for name in UNGATED:
        mlp = make(builtin_system, "activation", name, emb_dim=d, bias=False)
        assert mlp.hidden_dim == 4 * d == 192
        assert _n_params(mlp) == 2 * d * 192
    for name in GATED:
        mlp = make(builtin_system, "activation", name, emb_dim=d, bias=False)
        assert mlp.hidden_dim == 128, name
        assert _n_params(mlp) == 3 * d * 128 == 2 * d * 192, name
    # whole models too: swapping the MLP does not change the parameter count
    counts = {a: build(emb_dim=d, bias=False, activation=a).num_parameters() for a in GATED + ("gelu",)}
    assert len(set(counts.values())) == 1, counts


def test_explicit_ff_dim_is_used(builtin_system):
    for name in GATED + UNGATED:
        mlp = make(builtin_system, "activation", name, emb_dim=48, bias=False, ff_dim=100)
        assert mlp.hidden_dim == 100, name
        assert _n_params(mlp) == (3 if name in GATED else 2) * 48 * 100, name
    # the per-component option also works and wins over ff_dim
    model = build(activation={"name": "swiglu", "hidden_dim": 64}, ff_dim=100)
    assert model.blocks[0].mlp.hidden_dim == 64


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


HAND = {
    "gelu": _gelu_erf,
    "gelu_tanh": _gelu_tanh,
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
}
HAND["swiglu"], HAND["geglu"], HAND["reglu"] = HAND["silu"], HAND["gelu"], HAND["relu"]


@pytest.mark.parametrize("name", UNGATED + GATED)
def test_mlp_math(builtin_system, name):
    mlp = make(builtin_system, "activation", name, emb_dim=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 4, 16, generator=g)
    W1, b1, W2, b2 = mlp.fc.weight, mlp.fc.bias, mlp.proj.weight, mlp.proj.bias
    h = x @ W1.T + b1
    act = HAND[name]
    if name in GATED:  # fc holds [gate; up]: act(x W_gate) * (x W_up)
        gate, up = h[..., :mlp.hidden_dim], h[..., mlp.hidden_dim:]
        hidden = act(gate) * up
    else:
        hidden = act(h)
    torch.testing.assert_close(mlp(x), hidden @ W2.T + b2, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention context plumbing
# ---------------------------------------------------------------------------------------------

def test_causal_mask_with_offset():
    ctx = PositionalContext(offset=3, q_len=2)
    assert ctx.k_len == 5
    assert ctx.causal_mask(torch.device("cpu")).tolist() == [[True, True, True, True, False],
                                                             [True, True, True, True, True]]


def test_kv_cache_refuses_overflow():
    model = randomize_(build(position="rope"))
    cache = model.new_cache(4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(RuntimeError, match="cache"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
