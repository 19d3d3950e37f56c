"""The GPT skeleton end to end: every built-in combination, attention kernels, the seed config,
a plain-torch reference GPT, generation, the memory estimate and gradient checkpointing."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gptlab
from gptlab import GPT_CONFIG_124M, PRESETS, GPTModel
from gptlab.model.gpt import sample_next

from helpers import (ACTIVATIONS, ATTENTIONS, NORMS, PLACEMENTS, POSITIONS, TINY, build, clone_into,
                     count_checkpoints, randomize_, sweep, tiny_cfg)
from reference_gpt import RefGPT, gptlab_state_dict

V = TINY["vocab_size"]


# ---------------------------------------------------------------------------------------------
# every combination of the built-in components
# ---------------------------------------------------------------------------------------------

def test_every_builtin_combination_builds_trains_is_causal_and_caches(builtin_system):
    for kind, names in [("attention", ATTENTIONS), ("position", POSITIONS), ("norm", NORMS),
                        ("norm_placement", PLACEMENTS), ("activation", ACTIVATIONS)]:
        assert set(names) <= set(builtin_system.registry.names(kind)), kind
    combos = list(itertools.product(ATTENTIONS, POSITIONS, NORMS, PLACEMENTS, ACTIVATIONS))
    assert len(combos) == 640

    failures = sweep(builtin_system, [(f"{attention}/{position}/{norm}/{placement}/{activation}",
                                       tiny_cfg(attention=attention, position=position, norm=norm,
                                                norm_placement=placement, activation=activation))
                                      for attention, position, norm, placement, activation in combos])
    assert not failures, f"{len(failures)} combinations failed:\n" + "\n".join(failures[:40])


def test_default_components_reproduce_the_seed_architecture():
    model = build()
    assert model.components == {"attention": "sdpa", "position": "learned", "norm": "layernorm",
                                "norm_placement": "pre", "activation": "gelu"}
    assert isinstance(model.final_norm, nn.LayerNorm)
    assert model.head.weight is model.tok_emb.weight  # tied by default


def test_gpt2_init():
    """N(0, 0.02) weights and embeddings, zero biases, residual projections at 0.02 / sqrt(2L)."""
    L = 8
    model = build(emb_dim=64, n_layers=L, vocab_size=512, context_length=64, bias=True, qkv_bias=True)
    resid, other = [], []
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith(("attn.out_proj.weight", "mlp.proj.weight")):
            resid.append(p.detach().flatten())
        elif "norm" not in name:
            other.append(p.detach().flatten())
    assert len(resid) == 2 * L
    assert torch.cat(other).std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.cat(resid).std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.03)


def test_post_norm_has_no_final_norm_and_pre_norm_has_one():
    assert isinstance(build(norm_placement="post").final_norm, nn.Identity)
    for placement in ("pre", "sandwich", "parallel"):
        assert isinstance(build(norm_placement=placement).final_norm, nn.LayerNorm), placement


# ---------------------------------------------------------------------------------------------
# vanilla and sdpa attention, with and without grouped-query heads
# ---------------------------------------------------------------------------------------------

def _attention(name, n_kv_heads):
    return name if n_kv_heads is None else {"name": name, "n_kv_heads": n_kv_heads}


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_vanilla_and_sdpa_agree(n_kv_heads):
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    for position in POSITIONS:
        vanilla = randomize_(build(attention=_attention("vanilla", n_kv_heads), position=position), seed=2)
        sdpa = clone_into(vanilla, build(attention=_attention("sdpa", n_kv_heads), position=position, seed=5))
        vanilla.eval(), sdpa.eval()
        with torch.no_grad():
            a, b = vanilla(idx), sdpa(idx)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: f"{position}: {m}")
            # the cached path of both kernels (incl. GQA heads in the cache) matches the full forward
            for model, full in ((vanilla, a), (sdpa, b)):
                cache = model.new_cache(16)
                steps = [model(idx[:, :6], cache=cache), model(idx[:, 6:9], cache=cache)]
                steps += [model(idx[:, i:i + 1], cache=cache) for i in range(9, 16)]
                torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0,
                                           msg=lambda m: f"{position} cached: {m}")


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_query_qkv_shape_and_parameter_count(n_kv_heads):
    d, H = TINY["emb_dim"], TINY["n_heads"]
    head_dim = d // H
    mha = build(attention="sdpa")
    gqa = build(attention={"name": "sdpa", "n_kv_heads": n_kv_heads})
    for block in gqa.blocks:
        assert block.attn.qkv.weight.shape == (d + 2 * n_kv_heads * head_dim, d)
    saved = TINY["n_layers"] * 2 * (H - n_kv_heads) * head_dim * d
    assert mha.num_parameters() - gqa.num_parameters() == saved


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_grouped_query_heads_share_kv_like_duplicated_heads(attention):
    """GQA with 2 kv heads equals MHA whose kv heads are copies: query head h reads kv head h // 2."""
    d, H, n_kv = TINY["emb_dim"], TINY["n_heads"], 2
    hd = d // H
    gqa = randomize_(build(attention={"name": attention, "n_kv_heads": n_kv}, position="rope"), seed=4)
    mha = build(attention=attention, position="rope")
    state = gqa.state_dict()
    for key in [k for k in state if k.endswith("attn.qkv.weight")]:
        q, k, v = state[key].split([d, n_kv * hd, n_kv * hd])
        rep = lambda w: w.view(n_kv, hd, d).repeat_interleave(H // n_kv, dim=0).reshape(H * hd, d)
        state[key] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mha(idx), gqa(idx), atol=1e-5, rtol=0)


def test_n_kv_heads_must_divide_n_heads():
    with pytest.raises(gptlab.ConfigError, match="n_kv_heads"):
        build(attention={"name": "sdpa", "n_kv_heads": 3})
    with pytest.raises(gptlab.ConfigError, match="n_kv_heads"):
        build(attention={"name": "vanilla", "n_kv_heads": 0})


# ---------------------------------------------------------------------------------------------
# the seed example and parameter counts
# ---------------------------------------------------------------------------------------------

SEED_CONFIG = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
               "drop_rate": 0.1, "qkv_bias": False}


def expected_params(cfg: dict) -> int:
    """Parameter count of a GPT-2-style model (learned positions, pre-LN LayerNorm, 4x GELU MLP)."""
    C, d, L = cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    m = cfg.get("vocab_multiple") or 1
    V_ = -(-cfg["vocab_size"] // m) * m  # rows of the embedding and head, padded
    tied = cfg.get("tie_embeddings", True)
    ln = 2 * d  # weight + bias
    attn = d * 3 * d + (3 * d if cfg.get("qkv_bias", False) else 0) + d * d + d
    mlp = d * 4 * d + 4 * d + 4 * d * d + d
    block = 2 * ln + attn + mlp
    return V_ * d + C * d + L * block + ln + (0 if tied else V_ * d)


@pytest.fixture(scope="module")
def gpt124m():
    """The seed example, verbatim (the only full-size model the suite allocates)."""
    torch.manual_seed(0)
    from gptlab import GPTModel, GPT_CONFIG_124M
    model = GPTModel(GPT_CONFIG_124M)
    return model


def test_seed_example(gpt124m):
    assert GPT_CONFIG_124M == SEED_CONFIG  # the public seed dict is unchanged (and not mutated by building)
    gpt124m.eval()
    with torch.no_grad():
        logits = gpt124m(torch.randint(0, 50257, (2, 256)))
    assert logits.shape == (2, 256, 50257)
    assert torch.isfinite(logits).all()


def test_124m_parameter_counts(gpt124m):
    assert gpt124m.num_parameters() == expected_params(GPT_CONFIG_124M) == 124_412_160
    # the meta device gives the same count without allocating (checked against the real model)
    with torch.device("meta"):
        meta = GPTModel(GPT_CONFIG_124M)
        untied = GPTModel(dict(GPT_CONFIG_124M, tie_embeddings=False))
    assert meta.num_parameters() == gpt124m.num_parameters()
    assert untied.num_parameters() == expected_params(dict(GPT_CONFIG_124M, tie_embeddings=False)) == 163_009_536
    # the learned position table is the only position parameter
    assert gpt124m.num_parameters(exclude_position=True) == 124_412_160 - 1024 * 768


def test_presets():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert name in PRESETS
    cpu = [k for k in PRESETS if not k.startswith("gpt2")]
    assert cpu, "no CPU-sized presets"
    # the four Hugging Face sizes; published counts: 124,439,808 / 354,823,168 / 774,030,080 / 1,557,611,200
    sizes = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 16, 24), "gpt2-large": (1280, 20, 36),
             "gpt2-xl": (1600, 25, 48)}
    published = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                 "gpt2-xl": 1_557_611_200}
    for name, (d, H, L) in sizes.items():
        p = PRESETS[name]
        assert (p["emb_dim"], p["n_heads"], p["n_layers"]) == (d, H, L)
        assert p["vocab_size"] == 50257 and p["context_length"] == 1024 and p["qkv_bias"] is True
        with torch.device("meta"):
            model = GPTModel(p)
        assert model.components["activation"] == "gelu_tanh"
        # the GPU presets pad the vocabulary to 50304 rows (vocab_multiple 64): 47 rows of emb_dim more
        assert p["vocab_multiple"] == 64
        assert model.num_parameters() == expected_params(p) == published[name] + 47 * d, name
        with torch.device("meta"):
            unpadded = GPTModel({**p, "vocab_multiple": None})
        assert unpadded.num_parameters() == published[name], name
    for name in cpu:  # CPU presets build and run
        torch.manual_seed(0)
        model = GPTModel(PRESETS[name])
        with torch.no_grad():
            out = model(torch.randint(0, model.config.vocab_size, (1, 8)))
        assert out.shape == (1, 8, model.config.vocab_size)


# ---------------------------------------------------------------------------------------------
# the plain-torch reference GPT (tests/reference_gpt.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matches_independent_reference_gpt(qkv_bias):
    cfg = tiny_cfg(qkv_bias=qkv_bias)
    torch.manual_seed(0)
    ref = RefGPT(cfg)
    with torch.no_grad():  # non-trivial norms and biases too
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = GPTModel(dict(cfg, activation="gelu_tanh", tie_embeddings=False))
    model.load_state_dict(gptlab_state_dict(ref))  # strict: every key mapped
    model.eval()
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(idx[:, :7]), ref(idx[:, :7]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

def _greedy_by_hand(model, idx, n, window=None):
    with torch.no_grad():
        for _ in range(n):
            ctx = idx if window is None else idx[:, -window:]
            nxt = model(ctx)[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
    return idx


@pytest.fixture(scope="module")
def gen_models():
    return {pos: randomize_(build(position=pos, seed=7), seed=8).eval() for pos in ("learned", "rope", "alibi")}


@pytest.fixture
def prompt():
    return torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(11))


def test_temperature_zero_is_greedy_with_and_without_cache(gen_models, prompt):
    for pos, model in gen_models.items():
        expected = _greedy_by_hand(model, prompt, 10)
        cached = model.generate(prompt, 10, temperature=0)
        uncached = model.generate(prompt, 10, temperature=0, use_cache=False)
        assert cached.shape == (2, 14)
        assert torch.equal(cached[:, :4], prompt)
        assert torch.equal(cached, expected), pos
        assert torch.equal(uncached, expected), pos


def test_top_k_1_and_tiny_top_p_are_greedy(gen_models, prompt):
    g = torch.Generator().manual_seed(0)
    for pos, model in gen_models.items():
        greedy = model.generate(prompt, 8, temperature=0)
        assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1, generator=g), greedy), pos
        assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_p=1e-6, generator=g), greedy), pos


def test_sampling_is_reproducible_with_a_generator(gen_models, prompt):
    model = gen_models["rope"]
    a = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(123))
    b = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(123))
    c = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(321))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d = model.generate(prompt, 10, temperature=1.0, use_cache=False, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, d)  # same logits with or without the cache, hence the same samples


def test_generation_past_context_length(gen_models, prompt):
    C = TINY["context_length"]
    learned = gen_models["learned"]
    learned.train()
    out = learned.generate(prompt, 20, temperature=0)  # 24 tokens > context 16: crops to the last 16
    assert learned.training  # generate restores the mode it found
    learned.eval()
    assert out.shape == (2, 24)
    assert torch.equal(out, _greedy_by_hand(learned, prompt, 20, window=C))
    for pos in ("rope", "alibi"):  # no length limit: the whole sequence is seen, cached or not
        model = gen_models[pos]
        cached = model.generate(prompt, 20, temperature=0)
        assert cached.shape == (2, 24)
        assert torch.equal(cached, _greedy_by_hand(model, prompt, 20)), pos
        assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False), cached), pos


def test_learned_positions_refuse_longer_input():
    model = build()
    with pytest.raises(ValueError, match="learned"):
        model(torch.zeros(1, TINY["context_length"] + 1, dtype=torch.long))


def test_generate_rejects_bad_arguments(gen_models, prompt):
    model = gen_models["learned"]
    with pytest.raises(ValueError):
        model.generate(prompt, 2, temperature=-1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            model.generate(prompt, 2, top_p=bad)


def test_sample_next_top_p_stays_in_the_nucleus():
    probs = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    logits = probs.log().repeat(4000, 1)
    picks = sample_next(logits, 1.0, None, 0.5, torch.Generator().manual_seed(0)).flatten()
    # sorted: 0.40 (1), 0.30 (3), 0.15, ...: token 3 is kept because only 0.40 < 0.5 lies above it
    assert set(picks.tolist()) == {1, 3}
    share = (picks == 1).float().mean().item()
    assert abs(share - 0.40 / 0.70) < 0.03  # renormalised inside the nucleus
    # top_p 0.75: 0.40 + 0.30 = 0.70 < 0.75, so the 0.15 token joins
    picks = sample_next(logits, 1.0, None, 0.75, torch.Generator().manual_seed(1)).flatten()
    assert set(picks.tolist()) == {1, 3, 4}


def test_sample_next_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(3000, 1)
    picks = sample_next(logits, 1.0, 2, None, torch.Generator().manual_seed(0)).flatten()
    assert set(picks.tolist()) == {1, 3}
    assert abs((picks == 1).float().mean().item() - 1 / (1 + math.exp(-1))) < 0.03
    # temperature 2 halves the logit gap
    picks = sample_next(logits, 2.0, 2, None, torch.Generator().manual_seed(0)).flatten()
    assert abs((picks == 1).float().mean().item() - 1 / (1 + math.exp(-0.5))) < 0.03
    assert torch.equal(sample_next(logits[:2], 0.0, None, None), torch.tensor([[1], [1]]))


# ---------------------------------------------------------------------------------------------
# memory estimate
# ---------------------------------------------------------------------------------------------

def test_memory_estimate_accounting():
    model = build(n_layers=4, attention="sdpa")
    est = model.memory_estimate(batch_size=2, seq_len=16)
    n = model.num_parameters()
    assert est["parameters"] == n
    assert est["weights"] == 4 * n
    assert est["gradients"] == est["weights"]
    assert est["optimizer"] == 2 * est["weights"]
    assert est["total"] == est["weights"] + est["gradients"] + est["optimizer"] + est["activations"]
    assert est["activations"] > 0


def test_memory_estimate_activations():
    for attention, position in [("sdpa", "learned"), ("vanilla", "learned"), ("sdpa", "alibi")]:
        model = build(n_layers=4, attention=attention, position=position)
        one = model.memory_estimate(1, 16)["activations"]
        assert model.memory_estimate(2, 16)["activations"] == 2 * one
        assert model.memory_estimate(5, 16)["activations"] == 5 * one
        ckpt = model.memory_estimate(1, 16, gradient_checkpointing=True)["activations"]
        assert ckpt < one
    # the config switch is the default for the estimate
    ckpt_model = build(n_layers=4, gradient_checkpointing=True)
    plain_model = build(n_layers=4)
    assert ckpt_model.memory_estimate(2, 16)["activations"] < plain_model.memory_estimate(2, 16)["activations"]
    # explicit attention keeps the (heads x T x T) scores; a score bias also rules out the flash kernel
    sdpa = build(attention="sdpa").memory_estimate(2, 16)["activations"]
    vanilla = build(attention="vanilla").memory_estimate(2, 16)["activations"]
    alibi_sdpa = build(attention="sdpa", position="alibi").memory_estimate(2, 16)["activations"]
    assert vanilla > sdpa
    assert alibi_sdpa > sdpa
    # bf16 activations take half the bytes of fp32 ones
    m = build()
    assert m.memory_estimate(2, 16, dtype="bfloat16")["activations"] < m.memory_estimate(2, 16)["activations"]
    with pytest.raises(ValueError):
        m.memory_estimate(2, 16, dtype="int3")


def test_memory_estimate_counts_the_real_query_and_key_widths():
    # TINY: width 32, 4 heads of 8, 2 layers; fp32 activations; 2 x 16 tokens
    tokens, L, bytes_ = 2 * 16, TINY["n_layers"], 4
    base = build().memory_estimate(2, 16)["activations"]
    gqa = build(attention={"name": "sdpa", "n_kv_heads": 1}).memory_estimate(2, 16)["activations"]
    assert base - gqa == L * tokens * 2 * (32 - 8) * bytes_  # keys and values: 1 head of 8, not 4
    wide = build(head_dim=16).memory_estimate(2, 16)["activations"]
    assert wide - base == L * tokens * 4 * (64 - 32) * bytes_  # q, k, v and the attention output: 4 x 16 wide


# ---------------------------------------------------------------------------------------------
# gradient checkpointing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_gradient_checkpointing_matches(position, monkeypatch):
    calls = count_checkpoints(monkeypatch)
    plain = randomize_(build(position=position, n_layers=3), seed=3)
    ckpt = clone_into(plain, build(position=position, n_layers=3, gradient_checkpointing=True, seed=9))
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss)
    assert len(calls) == 3  # one checkpointed call per block, only for the checkpointing model
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# the options the Hugging Face families brought (head_dim, embedding_norm, the bias switches,
# parallel shared_norm, rope fraction and scaling), crossed with the axes they interact with
# ---------------------------------------------------------------------------------------------

LLAMA3_OPTIONS = dict(scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_context_length=64)
ROPE_SCALINGS = {"linear": dict(scaling="linear", factor=2.0), "ntk": dict(scaling="ntk", factor=4.0),
                 "llama3": LLAMA3_OPTIONS}


def _new_option_combos():
    """(label, config overrides) for every new option crossed with the axes it interacts with."""
    combos = []
    for attention, position, kv in itertools.product(ATTENTIONS, POSITIONS, (None, 2)):
        combos.append((f"head_dim=12/{attention}/{position}/n_kv_heads={kv}",
                       dict(head_dim=12, attention=_attention(attention, kv), position=position)))
    for norm, placement in itertools.product(NORMS, PLACEMENTS):
        combos.append((f"embedding_norm/{norm}/{placement}",
                       dict(embedding_norm=True, norm=norm, norm_placement=placement, position="rope")))
    for part, own, bias in itertools.product(("attn_out", "mlp", "norm"), (True, False), (True, False)):
        combos.append((f"{part}_bias={own}/bias={bias}", {f"{part}_bias": own, "bias": bias, "qkv_bias": bias}))
    for norm, activation in itertools.product(NORMS, ACTIVATIONS):
        combos.append((f"parallel shared_norm=false/{norm}/{activation}",
                       dict(norm_placement={"name": "parallel", "shared_norm": False}, norm=norm,
                            activation=activation, position="rope")))
    for fraction, attention, kv in itertools.product((0.5, 0.25), ATTENTIONS, (None, 2)):
        combos.append((f"rope fraction={fraction}/{attention}/n_kv_heads={kv}",
                       dict(position={"name": "rope", "fraction": fraction}, attention=_attention(attention, kv))))
    for (scaling, options), attention, kv in itertools.product(ROPE_SCALINGS.items(), ATTENTIONS, (None, 2)):
        combos.append((f"rope scaling={scaling}/{attention}/n_kv_heads={kv}",
                       dict(position={"name": "rope", **options}, attention=_attention(attention, kv))))
    for scaling in ("linear", "llama3"):  # partial rotation and scaling together (a NeoX-style head)
        combos.append((f"rope fraction=0.5 scaling={scaling}",
                       dict(position={"name": "rope", "fraction": 0.5, **ROPE_SCALINGS[scaling]},
                            norm_placement={"name": "parallel", "shared_norm": False})))
    return combos


def test_new_options_build_train_are_causal_and_cache(builtin_system):
    """``helpers.check_model`` (gradients reach every parameter, causality, cached decoding equals the full
    forward) for each new model option crossed with the components it interacts with."""
    combos = _new_option_combos()
    assert len(combos) > 70
    failures = sweep(builtin_system, [(label, tiny_cfg(**overrides)) for label, overrides in combos])
    assert not failures, f"{len(failures)} combinations failed:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("own", [None, True, False])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bias_switches_decide_which_biases_exist(bias, own, activation):
    """attn_out_bias / mlp_bias / norm_bias each override ``bias`` for their part (None: follow it);
    the q/k/v bias stays ``qkv_bias``'s."""
    expect = bias if own is None else own
    for part, names in (("attn_out", ["blocks.0.attn.out_proj.bias", "blocks.1.attn.out_proj.bias"]),
                        ("mlp", ["blocks.0.mlp.fc.bias", "blocks.0.mlp.proj.bias", "blocks.1.mlp.proj.bias"]),
                        ("norm", ["blocks.0.norm1.bias", "blocks.1.norm2.bias", "final_norm.bias",
                                  "embedding_norm.bias"])):
        model = build(bias=bias, qkv_bias=False, activation=activation, embedding_norm=True, **{f"{part}_bias": own})
        params = dict(model.named_parameters())
        assert model.config.uses_bias(part) is expect
        for name in names:
            assert (name in params) is expect, f"{part}_bias={own}, bias={bias}: {name}"
        assert "blocks.0.attn.qkv.bias" not in params
        others = {"attn_out": "blocks.0.attn.out_proj.bias", "mlp": "blocks.0.mlp.fc.bias",
                  "norm": "blocks.0.norm1.bias"}
        for other, name in others.items():  # the other parts still follow ``bias``
            if other != part:
                assert (name in params) is bias, f"{part}_bias={own} changed {name}"


def test_parallel_shared_norm_false_has_a_norm_per_branch():
    shared = randomize_(build(norm_placement="parallel", position="rope"), seed=2).eval()
    split = build(norm_placement={"name": "parallel", "shared_norm": False}, position="rope").eval()
    for block in shared.blocks:
        assert hasattr(block, "norm") and not hasattr(block, "norm1") and not hasattr(block, "norm2")
    for block in split.blocks:
        assert hasattr(block, "norm1") and hasattr(block, "norm2") and not hasattr(block, "norm")
    d, L = TINY["emb_dim"], TINY["n_layers"]
    assert split.num_parameters() - shared.num_parameters() == L * 2 * d  # one more LayerNorm (gain, bias) a block
    # with both branch norms equal to the shared one, the split block computes the same function
    state = {}
    for key, value in shared.state_dict().items():
        if ".norm." in key:
            state[key.replace(".norm.", ".norm1.")] = value
            state[key.replace(".norm.", ".norm2.")] = value
        else:
            state[key] = value
    split.load_state_dict(state)
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(split(idx), shared(idx), atol=1e-6, rtol=0)
        # ...and distinct branch norms make a difference (norm2 feeds the MLP, norm1 the attention)
        split.blocks[0].norm2.weight.mul_(1.5)
        assert (split(idx) - shared(idx)).abs().max() > 1e-3


@pytest.mark.parametrize("norm", NORMS)
def test_embedding_norm_normalises_what_the_first_block_reads(norm):
    plain = build(norm=norm)
    assert isinstance(plain.embedding_norm, nn.Identity)
    model = build(norm=norm, embedding_norm=True)  # fresh init: gain 1, bias 0
    assert not isinstance(model.embedding_norm, nn.Identity)
    assert model.num_parameters() - plain.num_parameters() == sum(p.numel() for p in model.embedding_norm.parameters())
    randomize_(model, seed=1)  # gains and bias away from 1 and 0
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    idx = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx)
        emb = model.tok_emb.weight[idx] + model.position.emb.weight[:8]  # token + learned position
        if norm == "layernorm":
            emb = emb - emb.mean(-1, keepdim=True)
        expected = emb / (emb.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * model.embedding_norm.weight
        if norm == "layernorm":
            expected = expected + model.embedding_norm.bias
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=0)


def test_head_dim_sets_the_width_of_every_head():
    d, H, hd, kv = TINY["emb_dim"], TINY["n_heads"], 12, 2
    model = build(head_dim=hd, attention={"name": "sdpa", "n_kv_heads": kv}, position="rope")
    assert model.config.head_size == hd
    for block in model.blocks:
        assert block.attn.qkv.weight.shape == (H * hd + 2 * kv * hd, d)
        assert block.attn.out_proj.weight.shape == (d, H * hd)
    # head_dim equal to emb_dim / n_heads is the default model, parameter for parameter
    same = build(head_dim=d // H)
    default = build()
    assert {n: p.shape for n, p in same.named_parameters()} == {n: p.shape for n, p in default.named_parameters()}
    # emb_dim need not divide by n_heads once head_dim is given
    odd = build(emb_dim=30, n_heads=4, head_dim=8)
    assert odd.blocks[0].attn.qkv.weight.shape == (3 * 4 * 8, 30)
    with pytest.raises(gptlab.ConfigError, match="head_dim"):
        build(emb_dim=30, n_heads=4)


# -- rope: numeric checks of fraction and scaling ---------------------------------------------

def _rotate(model, q, k, offset):
    ctx = model.position.context(offset, q.shape[2], q.device, q.dtype)
    return ctx.rotate(q, k)


def _reference_rope(x, positions, base):
    """Half-split rotary embedding of all of x's last dimension at ``positions``, written out."""
    dim = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    a, b = x.double().chunk(2, -1)
    return (x.double() * cos + torch.cat([-b, a], -1) * sin).float()


@pytest.mark.parametrize("fraction, rot", [(1.0, 8), (0.5, 4), (0.25, 2)])
def test_rope_fraction_rotates_the_first_dims_and_passes_the_rest(fraction, rot):
    model = build(position={"name": "rope", "fraction": fraction})
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    q2, k2 = _rotate(model, q, k, offset=3)
    assert torch.equal(q2[..., rot:], q[..., rot:]) and torch.equal(k2[..., rot:], k[..., rot:])
    positions = torch.arange(3, 8)
    # the rotated part is a full rope over `rot` dims (frequencies relative to `rot`, as GPT-NeoX)
    torch.testing.assert_close(q2[..., :rot], _reference_rope(q[..., :rot], positions, 10000.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(k2[..., :rot], _reference_rope(k[..., :rot], positions, 10000.0), atol=1e-5, rtol=0)
    assert (q2[..., :rot] - q[..., :rot]).abs().max() > 1e-2


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_rope_linear_scaling_is_position_divided_by_factor(factor):
    scaled = build(position={"name": "rope", "scaling": "linear", "factor": factor})
    plain = build(position="rope")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 4, 1, 8, generator=g)
    f = int(factor)
    for p in (0, f, 2 * f, 5 * f, 9 * f):  # 9 * f is past context_length: the tables grow
        a, b = _rotate(scaled, q, k, offset=p), _rotate(plain, q, k, offset=p // f)
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0, msg=lambda m: f"position {p}: {m}")
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0, msg=lambda m: f"position {p}: {m}")
    torch.testing.assert_close(scaled.position.inv_freq, plain.position.inv_freq / factor, atol=0, rtol=1e-6)


def test_rope_llama3_scaling_keeps_short_wavelengths_and_divides_long_ones():
    o = LLAMA3_OPTIONS
    plain = build(position="rope").position.inv_freq
    scaled = build(position={"name": "rope", **o}).position.inv_freq
    wavelength = 2 * math.pi / plain
    short = wavelength < o["original_context_length"] / o["high_freq_factor"]
    long = wavelength > o["original_context_length"] / o["low_freq_factor"]
    between = ~short & ~long
    assert short.any() and long.any() and between.any(), wavelength  # head 8: 6.3, 63, 628, 6283 vs 16 and 64
    torch.testing.assert_close(scaled[short], plain[short], atol=0, rtol=0)
    torch.testing.assert_close(scaled[long], plain[long] / o["factor"], atol=0, rtol=1e-6)
    smooth = (o["original_context_length"] / wavelength[between] - o["low_freq_factor"]) / (
        o["high_freq_factor"] - o["low_freq_factor"])
    torch.testing.assert_close(scaled[between], (1 - smooth) * plain[between] / o["factor"] + smooth * plain[between],
                               atol=0, rtol=1e-5)
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / o["factor"])).all()


def test_rope_ntk_scaling_raises_the_base():
    factor, base, rot = 4.0, 10000.0, TINY["emb_dim"] // TINY["n_heads"]
    plain = build(position="rope").position.inv_freq
    ntk = build(position={"name": "rope", "scaling": "ntk", "factor": factor}).position.inv_freq
    raised = build(position={"name": "rope", "base": base * factor ** (rot / (rot - 2))}).position.inv_freq
    torch.testing.assert_close(ntk, raised, atol=0, rtol=1e-6)
    assert ntk[0] == plain[0] == 1.0  # the highest frequency is kept
    torch.testing.assert_close(ntk[-1], plain[-1] / factor, atol=0, rtol=1e-5)  # the lowest stretches by factor


@pytest.mark.parametrize("overrides, named", [
    ({"position": {"name": "rope", "fraction": 0.375}}, "fraction"),  # 3 of 8 dims: odd
    ({"position": {"name": "rope", "fraction": 0.1}}, "fraction"),  # 0 of 8 dims
    ({"position": {"name": "rope", "fraction": 0.0}}, "fraction"),
    ({"position": {"name": "rope", "fraction": 1.5}}, "fraction"),
    ({"position": {"name": "rope", "scaling": "cubic", "factor": 2.0}}, "scaling"),
    ({"position": {"name": "rope", "scaling": "llama3", "factor": 8.0}}, "original_context_length"),
    ({"position": {"name": "rope", "scaling": "llama3", "factor": 8.0, "original_context_length": 64,
                   "low_freq_factor": 4.0, "high_freq_factor": 4.0}}, "high_freq_factor"),
    ({"position": {"name": "rope", "factor": 2.0}}, "factor"),
    ({"position": {"name": "rope", "scaling": "linear", "factor": 0.0}}, "factor"),
    ({"position": {"name": "rope", "scaling": "ntk", "factor": 2.0, "fraction": 0.25}}, "ntk"),  # 2 rotated dims
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": -4}, "head_dim"),
    ({"head_dim": 7, "position": "rope"}, "rotates 7"),  # rope needs an even head width
])
def test_invalid_new_options_are_one_line_config_errors(overrides, named):
    with pytest.raises(gptlab.ConfigError) as err:
        build(**overrides)
    message = str(err.value)
    assert named in message and "\n" not in message, message
