"""The wirings 'unet' and 'x0_mix' and the attention 'value_embed', checked against references
written by hand from each model's own modules: the function they compute, the sequential / sdpa
model they reduce to at their neutral settings, the causality / gradient / KV-cache sweep, gradient
checkpointing, torch.compile (one graph, eager's loss), the pre-build parameter count and their
options' errors."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gptlab.train.loop as gtrain
from gptlab import ConfigError, GPTModel
from gptlab.config.model import ModelConfig, parameter_parts
from gptlab.config.run import TrainConfig
from gptlab.data.tokens import Batches
from gptlab.plugin.manager import default_plugins

from helpers import TINY, clone_into, count_checkpoints, randomize_, sweep, tiny_cfg

V = TINY["vocab_size"]
CPU = torch.device("cpu")
#: value_embed in the first and last layers, as modded-nanogpt puts it
VE_LAYOUT = [{"at": [0, -1], "attention": "value_embed"}]


def tokens(B: int = 2, T: int = 14, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def twin(model: GPTModel, **cfg) -> tuple[GPTModel, list, list]:
    """A model of ``cfg`` holding ``model``'s weights wherever the names match (strict=False):
    (the twin, its missing keys, the unexpected keys of ``model``)."""
    other = GPTModel(cfg).eval()
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    return other, sorted(missing), sorted(unexpected)


def embed(model: GPTModel, idx: torch.Tensor) -> torch.Tensor:
    """The embeddings' output x0, written out: token (+ position) embedding, embedding norm (dropout 0)."""
    return model.embedding_norm(model.position.embed(model.tok_emb(idx), 0))


def context(model: GPTModel, idx: torch.Tensor, x: torch.Tensor):
    ctx = model.position.context(0, idx.shape[1], x.device, x.dtype)
    ctx.tokens = ctx.seen_tokens = idx
    return ctx


def assert_same_function_and_gradients(model: GPTModel, reference, idx: torch.Tensor) -> torch.Tensor:
    """``model(idx)`` equals ``reference(idx)`` (logits written by hand from the model's own modules),
    and so do the gradients of every parameter under a random weighting of the logits (to float32
    noise: an explicit softmax against sdpa). Returns the reference logits (detached)."""
    params = dict(model.named_parameters())
    weights = torch.randn(*idx.shape, V, generator=torch.Generator().manual_seed(11))
    got, want = model(idx), reference(idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g_got = torch.autograd.grad((got * weights).sum(), list(params.values()))
    g_want = torch.autograd.grad((want * weights).sum(), list(params.values()))
    for name, a, b in zip(params, g_got, g_want):
        assert b.abs().sum() > 0, f"{name}: the reference gives no gradient"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return want.detach()


# ---------------------------------------------------------------------------------------------
# unet: layer i's output, weighted, joins the input of layer L-1-i
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers", [4, 5])
def test_unet_equals_skips_written_by_hand_and_the_skips_matter(n_layers):
    cfg = tiny_cfg(n_layers=n_layers, wiring="unet")
    model = randomize_(GPTModel(cfg), seed=3).eval()
    w = model.wiring.skip_weights
    assert w.shape == (n_layers // 2,) and (w.abs() > 1e-3).all()  # randomised: every skip on
    assert len(set(w.tolist())) == n_layers // 2  # each with its own weight: a mixed-up index shows

    def reference(idx):
        x = embed(model, idx)
        ctx = context(model, idx, x)
        half, outputs = n_layers // 2, {}
        for i, block in enumerate(model.blocks):
            j = n_layers - 1 - i  # the layer whose output joins this one's input (odd L: the middle has none)
            if j < half and j < i:
                x = x + w[j] * outputs[j]
            x = block(x, ctx)
            outputs[i] = x
        return model.head(model.final_norm(x))

    idx = tokens()
    want = assert_same_function_and_gradients(model, reference, idx)
    with torch.no_grad():
        sequential, missing, unexpected = twin(model, **tiny_cfg(n_layers=n_layers))
        assert missing == [] and unexpected == ["wiring.skip_weights"]
        assert (sequential(idx) - want).abs().max() > 1e-2, "the skips changed nothing"
        model.wiring.skip_weights.zero_()  # every skip off: the sequential model, bit for bit
        assert torch.equal(model(idx), sequential(idx))


def test_unet_init_sets_every_skip_weight():
    assert torch.equal(GPTModel(tiny_cfg(n_layers=5, wiring="unet")).wiring.skip_weights, torch.ones(2))
    model = GPTModel(tiny_cfg(n_layers=6, wiring={"name": "unet", "init": 0.25}))
    assert torch.equal(model.wiring.skip_weights, torch.full((3,), 0.25))
    assert GPTModel(tiny_cfg(n_layers=1, wiring="unet")).wiring.skip_weights.shape == (0,)


# ---------------------------------------------------------------------------------------------
# x0_mix: layer i's input is a_i h + b_i x0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["learned", "rope"])
def test_x0_mix_equals_the_mix_written_by_hand(position):
    """x0 is the embeddings' output after the embedding norm (on here), as modded-nanogpt's norm(embed(idx))."""
    cfg = tiny_cfg(n_layers=3, position=position, wiring="x0_mix", embedding_norm=True)
    model = randomize_(GPTModel(cfg), seed=4).eval()
    a, b = model.wiring.a, model.wiring.b
    assert (a - 1).abs().min() > 1e-3 and b.abs().min() > 1e-3  # randomised away from the sequential model

    def reference(idx):
        x0 = embed(model, idx)
        ctx = context(model, idx, x0)
        h = x0
        for i, block in enumerate(model.blocks):
            h = block(a[i] * h + b[i] * x0, ctx)
        return model.head(model.final_norm(h))

    idx = tokens()
    want = assert_same_function_and_gradients(model, reference, idx)
    with torch.no_grad():
        sequential, missing, unexpected = twin(model, **{**cfg, "wiring": "sequential"})
        assert missing == [] and unexpected == ["wiring.a", "wiring.b"]
        assert (sequential(idx) - want).abs().max() > 1e-2, "the mix changed nothing"


def test_x0_mix_at_its_default_init_is_the_sequential_model_bit_for_bit():
    cfg = tiny_cfg(n_layers=3, position="rope", wiring="x0_mix")
    model = GPTModel(cfg).eval()
    assert torch.equal(model.wiring.a, torch.ones(3)) and torch.equal(model.wiring.b, torch.zeros(3))
    init = {n: p.clone() for n, p in model.wiring.named_parameters()}
    randomize_(model, seed=5)
    with torch.no_grad():
        for n, p in model.wiring.named_parameters():
            p.copy_(init[n])  # random blocks, the wiring at its default init
    sequential, missing, unexpected = twin(model, **{**cfg, "wiring": "sequential"})
    assert missing == [] and unexpected == ["wiring.a", "wiring.b"]
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), sequential(idx))
        model.wiring.b.fill_(0.5)  # control: x0 mixed in moves the logits
        assert (model(idx) - sequential(idx)).abs().max() > 1e-2
    init_b = GPTModel(tiny_cfg(n_layers=3, wiring={"name": "x0_mix", "init": 0.3})).wiring
    assert torch.equal(init_b.a, torch.ones(3)) and torch.equal(init_b.b, torch.full((3,), 0.3))


# ---------------------------------------------------------------------------------------------
# value_embed: v <- mix[0] v + mix[1] E[token]
# ---------------------------------------------------------------------------------------------

def attention_by_hand(attn, h: torch.Tensor, idx: torch.Tensor, ctx, value_embed: bool) -> torch.Tensor:
    """Causal softmax attention from the module's own projections, with an explicit softmax (no sdpa):
    q, k, v from qkv, the value embedding mixed into v when asked, rotation, grouped heads, out_proj."""
    B, T, _ = h.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv(h).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.reshape(B, T, n, D).transpose(1, 2) for t, n in ((q, H), (k, Hkv), (v, Hkv)))
    if value_embed:
        table = attn.value_emb.weight
        assert table.shape == (V, Hkv * D)
        v = attn.mix[0] * v + attn.mix[1] * table[idx].reshape(B, T, Hkv, D).transpose(1, 2)
    if ctx.rotate is not None:
        q, k = ctx.rotate(q, k)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_value_embed_layers_equal_their_attention_written_by_hand(position):
    """Layers 0 and 2 of 3 mix a value embedding into v (2 kv heads for 4 query heads); layer 1 is sdpa."""
    layers = [{"at": [0, -1], "attention": {"name": "value_embed", "n_kv_heads": 2}}]
    cfg = tiny_cfg(n_layers=3, position=position, attention={"name": "sdpa", "n_kv_heads": 2}, layers=layers)
    model = randomize_(GPTModel(cfg), seed=6).eval()
    uses = [hasattr(block.attn, "value_emb") for block in model.blocks]
    assert uses == [True, False, True]
    for i in (0, 2):
        mix = model.blocks[i].attn.mix
        assert mix.shape == (2,) and (mix.abs() > 1e-3).all()

    def reference(idx):
        x = embed(model, idx)
        ctx = context(model, idx, x)
        for block, ve in zip(model.blocks, uses):
            x = x + attention_by_hand(block.attn, block.norm1(x), idx, ctx, ve)
            x = x + block.mlp(block.norm2(x))
        return model.head(model.final_norm(x))

    idx = tokens()
    want = assert_same_function_and_gradients(model, reference, idx)
    with torch.no_grad():
        plain, missing, unexpected = twin(model, **{**cfg, "layers": []})
        assert missing == []
        assert unexpected == [f"blocks.{i}.attn.{n}" for i in (0, 2) for n in ("mix", "value_emb.weight")]
        assert (plain(idx) - want).abs().max() > 1e-2, "the value embeddings changed nothing"


def test_value_embed_with_mix_1_0_is_the_sdpa_attention():
    cfg = tiny_cfg(n_layers=3, position="rope", layers=[{"at": [0, -1], "attention": {"name": "value_embed",
                                                                                      "mix": [1, 0]}}])
    model = GPTModel(cfg).eval()
    assert all(torch.equal(model.blocks[i].attn.mix, torch.tensor([1.0, 0.0])) for i in (0, 2))  # the option
    randomize_(model, seed=7)
    with torch.no_grad():
        for i in (0, 2):
            model.blocks[i].attn.mix.copy_(torch.tensor([1.0, 0.0]))
    sdpa, missing, unexpected = twin(model, **{**cfg, "layers": []})
    assert missing == [] and len(unexpected) == 4
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), sdpa(idx), atol=1e-6, rtol=0)
        model.blocks[2].attn.mix.copy_(torch.tensor([1.0, 0.5]))  # control: the embedding does reach v
        assert (model(idx) - sdpa(idx)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# causality, gradients and the KV cache
# ---------------------------------------------------------------------------------------------

def variants() -> dict[str, dict]:
    return {
        "unet": dict(n_layers=3, wiring="unet"),
        "x0_mix": dict(n_layers=3, wiring="x0_mix"),
        "value_embed": dict(n_layers=3, layers=VE_LAYOUT),
        "unet+value_embed-gqa": dict(n_layers=4, wiring="unet", layers=[
            {"at": [0, -1], "attention": {"name": "value_embed", "n_kv_heads": 2}}]),
    }


def test_the_causality_gradient_and_cache_sweep_covers_the_wirings_and_value_embed():
    cases = [(f"{position}/{label}", tiny_cfg(position=position, **overrides))
             for position, (label, overrides) in itertools.product(["learned", "rope", "alibi", "none"],
                                                                   variants().items())]
    failures, count = sweep(default_plugins(), cases), len(cases)
    assert count == 16 and not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# gradient checkpointing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["unet", "x0_mix", "value_embed"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(label, monkeypatch):
    calls = count_checkpoints(monkeypatch)
    overrides = {**variants()[label], "position": "rope"}
    plain = randomize_(GPTModel(tiny_cfg(**overrides)), seed=8)
    ckpt = clone_into(plain, GPTModel(tiny_cfg(**overrides, gradient_checkpointing=True)))
    idx, targets = tokens(T=16, seed=0), tokens(T=16, seed=1)
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss)
    assert len(calls) == 3  # one checkpointed call per block, for the checkpointing model only
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    grads = dict(ckpt.named_parameters())
    extra = [n for n in grads if n.startswith("wiring.") or ".attn.mix" in n or "value_emb" in n]
    assert extra, "no parameter of the component under test"
    for name, p in plain.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    assert all(grads[n].grad.abs().sum() > 0 for n in extra)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["unet", "x0_mix", "value_embed"])
def test_compiled_training_is_one_graph_with_the_eager_loss(label, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    counter = CompileCounterWithBackend("aot_eager")  # counts graphs; aot_eager keeps it fast
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter))
    torch._dynamo.reset()
    try:
        cfg = tiny_cfg(position="rope", **variants()[label])
        model = randomize_(GPTModel(cfg), seed=9).train()
        eager = clone_into(model, GPTModel(cfg)).train()
        t = TrainConfig(lr=1e-3)
        ctx = gtrain.autocast_for(t, CPU)
        compiled, note = gtrain.compile_or_fallback(model, (4, 16), CPU, ctx)
        assert note == "compiled", note
        assert counter.frame_count == 1
        data = np.random.RandomState(0).randint(0, V, 3000).astype(np.uint16)
        runs = {}
        for name, step_model, owner in (("compiled", compiled, model), ("eager", eager, eager)):
            optimizer, batches = gtrain.make_optimizer(owner, t), Batches(data, 4, 16, seed=0, device=CPU)
            params = list(owner.parameters())
            runs[name] = torch.stack([gtrain.train_step(step_model, optimizer, batches.next, 1, ctx, 1.0, params)
                                      for _ in range(3)]).detach()
        torch.testing.assert_close(runs["compiled"], runs["eager"], atol=1e-5, rtol=0)
        assert len(set(runs["eager"].tolist())) == 3  # the steps did train: three different losses
        assert counter.frame_count == 1, f"{label}: recompiled ({counter.frame_count} graphs)"
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# parameter counts and options
# ---------------------------------------------------------------------------------------------

def counted(cfg: dict) -> tuple[int, int]:
    """(the pre-build count, the meta-built model's num_parameters())."""
    config = ModelConfig.from_any(cfg)
    with torch.device("meta"):
        model = GPTModel(config)
    return sum(parameter_parts(config, default_plugins()).values()), model.num_parameters()


@pytest.mark.parametrize("overrides, extra", [
    (dict(n_layers=4, wiring="unet"), 2),
    (dict(n_layers=5, wiring="unet"), 2),
    (dict(n_layers=5, wiring="x0_mix"), 10),
    # padded vocab 64 x 4 heads of 8, plus the two mix scalars, in each of layers 0 and 4
    (dict(n_layers=5, layers=VE_LAYOUT), 2 * (64 * 32 + 2)),
    # 2 kv heads of 8: a table half as wide, and the kv projections shrink as in sdpa
    (dict(n_layers=5, layers=[{"at": [0, -1], "attention": {"name": "value_embed", "n_kv_heads": 2}}]),
     2 * (64 * 16 + 2 - 2 * 32 * 16)),
], ids=["unet-even", "unet-odd", "x0_mix", "value_embed", "value_embed-gqa"])
def test_the_pre_build_count_is_the_models(overrides, extra):
    cfg = tiny_cfg(vocab_multiple=64, **overrides)  # padded_vocab 64: the value table has its rows
    before, built = counted(cfg)
    assert before == built
    base_before, base_built = counted(tiny_cfg(vocab_multiple=64, n_layers=overrides["n_layers"]))
    assert base_before == base_built and built - base_built == extra


def test_the_new_parameters_get_the_optimizer_roles_their_docstrings_give():
    """The value table is an embedding; the mix, skip and x0-mix weights are scalars (never matrices)."""
    from gptlab.train.recipe import param_infos

    model = GPTModel(tiny_cfg(n_layers=4, wiring="unet", layers=VE_LAYOUT))
    roles = {i.name: i.role for i in param_infos(model, TrainConfig())}
    assert roles["blocks.0.attn.value_emb.weight"] == roles["blocks.3.attn.value_emb.weight"] == "embeddings"
    assert roles["blocks.0.attn.mix"] == roles["wiring.skip_weights"] == "scalars"
    x0 = {i.name: i.role for i in param_infos(GPTModel(tiny_cfg(wiring="x0_mix")), TrainConfig())}
    assert x0["wiring.a"] == x0["wiring.b"] == "scalars"


@pytest.mark.parametrize("overrides, words", [
    (dict(wiring={"name": "unet", "init": -1}), ["wiring 'unet'", "option init", ">= 0", "-1"]),
    (dict(wiring={"name": "x0_mix", "init": -0.5}), ["wiring 'x0_mix'", "option init", ">= 0", "-0.5"]),
    (dict(attention={"name": "value_embed", "mix": [1]}), ["attention 'value_embed'", "option mix", "two numbers",
                                                           "[1]"]),
    (dict(n_layers=4, layers=[{"at": -1, "attention": {"name": "value_embed", "mix": [1, "a"]}}]),
     ["model.layers: layer 3: attention 'value_embed'", "option mix", "two numbers", "[1, 'a']"]),
], ids=["unet-init", "x0_mix-init", "value_embed-mix", "value_embed-mix-in-a-layout"])
def test_bad_options_are_one_line_errors_naming_the_option(overrides, words):
    with pytest.raises(ConfigError) as info:
        GPTModel(tiny_cfg(**overrides))
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
