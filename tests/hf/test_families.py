"""Every Hugging Face family gptlab reads and writes, checked against transformers itself.

For each family a tiny model is built with transformers from a config object (never the hub),
every parameter is randomised (norm gains and biases included, so a tensor mapped to the wrong
place cannot hide behind ones and zeros), saved with ``save_pretrained`` and loaded with
``GPTModel.from_hf``: logits agree to 1e-4 and greedy generation gives the same tokens as
transformers' own ``generate``, with and without gptlab's KV cache. Exporting runs the map
backwards: ``save_hf`` writes a directory ``AutoModelForCausalLM.from_pretrained`` reads back to
the same logits and tokens, for imported models and for models built in gptlab. What gptlab
cannot reproduce is refused, naming the key or the component; and a new family is one plugin file.

Tolerance: logits are compared with ``atol=1e-4, rtol=0``. With the weights below the logits
reach about 11 in magnitude and the two implementations differ by 2e-6 to 1.2e-5 (float32
rounding of the same sums in another order), so an absolute bound at this scale needs no
relative term.
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import transformers  # noqa: E402  (the dev extra; CI installs it)
from safetensors.torch import load_file  # noqa: E402

import gptlab  # noqa: E402
from gptlab import ConfigError, GPTModel  # noqa: E402

from helpers import randomize_, write_plugin  # noqa: E402

VOCAB = 97
PROMPT, NEW = 5, 10  # greedy generation: 5 prompt tokens, 10 new ones
ATOL = 1e-4
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # nothing stops generation early

LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, **NO_SPECIAL)
NEOX = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **NO_SPECIAL)

#: name -> (transformers config class, model class, config kwargs, family save_hf writes,
#:          the gptlab config keys the import must produce)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, **NO_SPECIAL),
             "gpt2", {"position": "learned", "norm_placement": "pre", "activation": "gelu_tanh"}),
    "openai-gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel",
                   dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, **NO_SPECIAL),
                   "openai-gpt", {"norm_placement": "post", "activation": "gelu_tanh"}),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA, num_key_value_heads=2),
                  "llama", {"attention": {"name": "sdpa", "n_kv_heads": 2}, "tie_embeddings": False,
                            "qkv_bias": False, "bias": False}),
    # head_dim 12 != 32 / 4, every bias, a tied head and llama3 rope scaling (with a base of its own)
    "llama-headdim-bias-llama3": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(LLAMA, num_key_value_heads=2, head_dim=12, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "llama", {"head_dim": 12, "qkv_bias": True, "attn_out_bias": True, "mlp_bias": True, "tie_embeddings": True,
                  "position": {"name": "rope", "base": 500.0, "scaling": "llama3", "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}}),
    "llama-mqa-linear": ("LlamaConfig", "LlamaForCausalLM",
                         dict(LLAMA, num_key_value_heads=1,
                              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                         "llama", {"attention": {"name": "sdpa", "n_kv_heads": 1},
                                   "position": {"name": "rope", "scaling": "linear", "factor": 2.0}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA, num_key_value_heads=2, sliding_window=None),
                "llama", {"attention": {"name": "sdpa", "n_kv_heads": 2}}),
    "neox-parallel-partial-rope": (
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(NEOX, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        "gpt_neox", {"norm_placement": {"name": "parallel", "shared_norm": False},
                     "position": {"name": "rope", "fraction": 0.25}, "tie_embeddings": False}),
    "neox-sequential-nobias": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                               dict(NEOX, use_parallel_residual=False, attention_bias=False),
                               "gpt_neox", {"norm_placement": "pre", "qkv_bias": False, "attn_out_bias": False}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                                      **NO_SPECIAL),
              "bloom", {"position": "alibi", "embedding_norm": True, "activation": "gelu_tanh"}),
    # 6 heads: ALiBi's slopes for a head count that is not a power of two
    "bloom-6-heads": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=36, n_layer=2, n_head=6,
                                                              **NO_SPECIAL),
                      "bloom", {"n_heads": 6, "position": "alibi"}),
}


@torch.no_grad()
def randomise_hf_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: matrices N(0, 0.5), embeddings N(0, 1), norm gains 1 + N(0, 0.2),
    biases N(0, 0.2). (0.2 everywhere also catches a mis-mapped tensor, but then greedy decoding
    of a tied model mostly repeats one token; these scales give varied sequences to compare.)"""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if is_norm and name == "weight":
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            elif isinstance(module, torch.nn.Embedding):
                p.copy_(noise)
            else:
                p.copy_(0.5 * noise)
    return model


def make_hf(name: str, seed: int = 0):
    config_cls, model_cls, kwargs, *_ = FAMILIES[name]
    cfg = getattr(transformers, config_cls)(**kwargs)
    return randomise_hf_(getattr(transformers, model_cls)(cfg), seed).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(name)``: (transformers model, the directory it was saved to), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            hf = make_hf(name)
            directory = tmp_path_factory.mktemp(name)
            hf.save_pretrained(directory)
            built[name] = SimpleNamespace(hf=hf, dir=directory, export_as=FAMILIES[name][3], expect=FAMILIES[name][4])
        return built[name]

    return get


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


def hf_greedy(hf, prompt):
    # an explicit attention mask: with pad_token_id=0 transformers would otherwise mask prompt tokens equal to 0
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


def assert_same_logits_and_greedy(ours, hf, what=""):
    idx = tokens()
    theirs = logits_of(hf, idx)
    assert theirs.abs().max() > 1.0  # randomised for real, not a near-zero model where anything matches
    torch.testing.assert_close(logits_of(ours, idx), theirs, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")
    prompt = idx[:, :PROMPT]
    cached = ours.generate(prompt, NEW, temperature=0)
    uncached = ours.generate(prompt, NEW, temperature=0, use_cache=False)
    assert cached.shape == (2, PROMPT + NEW)
    assert torch.equal(cached, uncached), f"{what}: the KV cache changed greedy tokens"
    assert torch.equal(cached, hf_greedy(hf, prompt)), f"{what}: greedy tokens differ from transformers'"
    return cached


def plain(value):
    return value.to_plain() if hasattr(value, "to_plain") else value


# ---------------------------------------------------------------------------------------------
# import: every family matches transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_transformers_logits_and_greedy_tokens(checkpoint, name):
    ck = checkpoint(name)
    ours = GPTModel.from_hf(ck.dir).eval()
    got = ours.config.to_dict()
    for key, want in ck.expect.items():
        assert plain(got[key]) == want, f"{name}: model.{key} is {got[key]!r}, expected {want!r}"
    assert ours.num_parameters() == sum(p.numel() for p in ck.hf.parameters())
    out = assert_same_logits_and_greedy(ours, ck.hf, name)
    assert any(len(set(row[PROMPT:].tolist())) > 1 for row in out), f"{name}: one token repeated, a weak check"


# ---------------------------------------------------------------------------------------------
# export: the imported models written back out
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_imported_model_exports_and_transformers_reads_it_back(checkpoint, name, tmp_path):
    ck = checkpoint(name)
    ours = GPTModel.from_hf(ck.dir).eval()
    out = tmp_path / "export"
    assert ours.save_hf(out) == ck.export_as
    assert json.loads((out / "config.json").read_text())["model_type"] == ck.export_as
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_same_logits_and_greedy(ours, back, f"{name} exported as {ck.export_as}")
    again = GPTModel.from_hf(out).eval()
    assert again.config.to_dict() == ours.config.to_dict(), name
    theirs = again.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs[key], value), f"{name}: {key} changed in the round trip"


# ---------------------------------------------------------------------------------------------
# export: models built in gptlab
# ---------------------------------------------------------------------------------------------

NATIVE_BASE = dict(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)

#: name -> (gptlab config overrides, family written, checkpoint tensors that must be written as zeros)
NATIVE = {
    # the default gptlab model: GPT-2 with exact GELU and no q/k/v bias (written as zeros)
    "default-as-gpt2": ({"qkv_bias": False}, "gpt2", ["transformer.h.0.attn.c_attn.bias"]),
    "post-ln-as-openai-gpt": ({"norm_placement": "post", "activation": "gelu_tanh", "qkv_bias": True},
                              "openai-gpt", []),
    "llama-like": ({"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False,
                    "attention": {"name": "sdpa", "n_kv_heads": 2}, "tie_embeddings": False}, "llama", []),
    # q/k/v biases without an output-projection bias (Qwen2's layout): Llama writes o_proj.bias as zeros
    "llama-like-qkv-bias-headdim-llama3": (
        {"position": {"name": "rope", "base": 500.0, "scaling": "llama3", "factor": 4.0, "original_context_length": 16},
         "norm": {"name": "rmsnorm", "eps": 1e-6}, "activation": "swiglu", "qkv_bias": True, "bias": False,
         "mlp_bias": True, "head_dim": 12, "attention": {"name": "sdpa", "n_kv_heads": 1}},
        "llama", ["model.layers.0.self_attn.o_proj.bias"]),
    "neox-like": ({"position": {"name": "rope", "fraction": 0.5}, "norm_placement": {"name": "parallel",
                                                                                   "shared_norm": False},
                   "tie_embeddings": False, "qkv_bias": True}, "gpt_neox", []),
    # no MLP or norm biases: GPT-NeoX writes them as zeros
    "neox-like-sequential-nobias": ({"position": "rope", "bias": False, "tie_embeddings": False},
                                    "gpt_neox", ["gpt_neox.layers.0.mlp.dense_h_to_4h.bias",
                                                 "gpt_neox.layers.1.input_layernorm.bias",
                                                 "gpt_neox.final_layer_norm.bias"]),
    "bloom-like": ({"position": "alibi", "embedding_norm": True, "activation": "gelu_tanh", "qkv_bias": True},
                   "bloom", []),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_gptlab_model_exports_to_its_family(name, tmp_path):
    overrides, family, zeros = NATIVE[name]
    torch.manual_seed(0)
    ours = randomize_(GPTModel({**NATIVE_BASE, **overrides}), seed=3).eval()
    assert ours.save_hf(tmp_path) == family
    written = load_file(tmp_path / "model.safetensors")
    for key in zeros:
        assert key in written and torch.count_nonzero(written[key]) == 0, key
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.model_type == family
    assert_same_logits_and_greedy(ours, back, f"{name} as {family}")
    again = GPTModel.from_hf(tmp_path).eval()
    idx = tokens()
    torch.testing.assert_close(logits_of(again, idx), logits_of(ours, idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, overrides", [
    ("gpt2", {}),
    ("llama", {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False,
               "attention": {"name": "vanilla", "n_kv_heads": 2}}),
], ids=["gpt2", "llama"])
def test_vanilla_attention_model_exports_like_sdpa(tmp_path, family, overrides):
    """'vanilla' and 'sdpa' compute the same function (to_hf accepts both); the export writes the
    family and reads back as sdpa, which must not count as a change of model."""
    attention = overrides.get("attention", "vanilla")
    ours = randomize_(GPTModel({**NATIVE_BASE, **overrides, "attention": attention}), seed=4).eval()
    assert ours.save_hf(tmp_path) == family
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_logits_and_greedy(ours, back, f"vanilla attention as {family}")


# ---------------------------------------------------------------------------------------------
# sparse config.json files mean what they mean to transformers
# ---------------------------------------------------------------------------------------------

def test_neox_config_without_rotary_fraction_reads_transformers_default(checkpoint, tmp_path):
    """transformers' GPTNeoXConfig rotates 1/4 of each head when config.json names no
    partial_rotary_factor (or rotary_pct); gptlab must read the same sparse file the same way."""
    ck = checkpoint("neox-sequential-nobias")
    cfg = json.loads((ck.dir / "config.json").read_text())
    cfg.get("rope_parameters", {}).pop("partial_rotary_factor", None)
    for key in ("partial_rotary_factor", "rotary_pct"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ck.dir / "model.safetensors", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = GPTModel.from_hf(tmp_path).eval()
    torch.testing.assert_close(logits_of(ours, tokens()), logits_of(hf, tokens()), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# sharded safetensors and pickles
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel-partial-rope"])
def test_sharded_safetensors_load(name, tmp_path):
    hf = make_hf(name, seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = GPTModel.from_hf(tmp_path).eval()
    torch.testing.assert_close(logits_of(ours, tokens()), logits_of(hf, tokens()), atol=ATOL, rtol=0)


def test_pickle_checkpoint_of_a_row_mapped_family_is_read_weights_only(checkpoint, tmp_path, monkeypatch):
    """tests/test_hf.py covers GPT-2 pickles; here Llama's q/k/v rows, and the flag torch.load gets."""
    ck = checkpoint("llama-gqa")
    shutil.copy(ck.dir / "config.json", tmp_path)
    torch.save(ck.hf.state_dict(), tmp_path / "pytorch_model.bin")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ours = GPTModel.from_hf(tmp_path).eval()
    assert calls == [True]
    torch.testing.assert_close(logits_of(ours, tokens()), logits_of(ck.hf, tokens()), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize("name, change, named", [
    ("mistral", {"sliding_window": 16}, "sliding_window"),  # smaller than max_position_embeddings (64)
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ("bloom", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("llama-gqa", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "dynamic"),
    ("llama-gqa", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "yarn"),
    ("llama-gqa", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),  # the old layout
    ("llama-gqa", {"rope_parameters": LLAMA3}, "original_max_position_embeddings"),
    ("llama-gqa", {"hidden_act": "gelu"}, "hidden_act"),
    ("neox-sequential-nobias", {"hidden_act": "gelu_fast"}, "hidden_act"),
])
def test_hf_switch_gptlab_cannot_reproduce_is_refused_naming_it(checkpoint, tmp_path, name, change, named):
    ck = checkpoint(name)
    cfg = json.loads((ck.dir / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ck.dir / "model.safetensors", tmp_path)
    with pytest.raises(ConfigError) as err:
        GPTModel.from_hf(tmp_path)
    message = str(err.value)
    assert named in message and "config.json" in message and "\n" not in message, message


def test_mistral_window_covering_the_context_loads(checkpoint, tmp_path):
    ck = checkpoint("mistral")
    cfg = json.loads((ck.dir / "config.json").read_text())
    cfg["sliding_window"] = cfg["max_position_embeddings"]  # never slides within the context
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ck.dir / "model.safetensors", tmp_path)
    ours = GPTModel.from_hf(tmp_path).eval()
    torch.testing.assert_close(logits_of(ours, tokens()), logits_of(ck.hf, tokens()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides, named", [
    ({"position": "sinusoidal"}, "sinusoidal"),
    ({"norm_placement": "sandwich"}, "sandwich"),
    ({"position": {"name": "rope", "scaling": "ntk", "factor": 2.0}, "norm": "rmsnorm", "activation": "swiglu"},
     "ntk"),
    ({"position": {"name": "rope", "fraction": 0.5}, "norm": "rmsnorm", "activation": "swiglu"}, "fraction"),
])
def test_gptlab_model_of_no_family_is_refused_naming_the_component(tmp_path, overrides, named):
    model = GPTModel({**NATIVE_BASE, **overrides})
    with pytest.raises(ConfigError) as err:
        model.save_hf(tmp_path / "out")
    message = str(err.value)
    assert named in message and "\n" not in message, message
    assert not (tmp_path / "out" / "config.json").exists()


# ---------------------------------------------------------------------------------------------
# a family a user adds with one file
# ---------------------------------------------------------------------------------------------

QWEN2_PLUGIN = '''
    """Importer 'qwen2': Llama's layout with q/k/v biases and no bias on o_proj or the MLP."""
    import gptlab
    from gptlab import HFImport
    from gptlab.hf.checkpoint import fused_rows
    from gptlab.hf.helpers import HFConfig


    def qwen2(hf_config, source):
        hf = HFConfig(hf_config, source, {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_dropout": 0.0})
        hf.choice("hidden_act", {"silu": "swiglu"})
        hf.fixed("use_sliding_window", False, "gptlab attends to the whole context")
        emb, heads = hf.integer("hidden_size"), hf.integer("num_attention_heads")
        hidden = hf.integer("intermediate_size")
        kv, hd, tied = hf.integer("num_key_value_heads", heads), emb // heads, hf.flag("tie_word_embeddings")
        cfg = {"vocab_size": hf.integer("vocab_size"), "context_length": hf.integer("max_position_embeddings"),
               "emb_dim": emb, "n_heads": heads, "n_layers": hf.integer("num_hidden_layers"),
               "drop_rate": hf.number("attention_dropout"), "qkv_bias": True, "bias": False, "tie_embeddings": tied,
               "attention": {"name": "sdpa", "n_kv_heads": kv}, "position": {"name": "rope", **hf.rope_options()}, "activation": "swiglu",
               "norm": {"name": "rmsnorm", "eps": hf.number("rms_norm_eps", positive=True)}, "ff_dim": hidden}
        qkv, gate_up = fused_rows(heads * hd, kv * hd, kv * hd), fused_rows(hidden, hidden)
        t = {"embed_tokens.weight": ("tok_emb.weight", False), "norm.weight": ("final_norm.weight", False)}
        if not tied:
            t["lm_head.weight"] = ("head.weight", False)
        for i in range(cfg["n_layers"]):
            a, b = f"layers.{i}.", f"blocks.{i}."
            for proj, rows in zip(("q_proj", "k_proj", "v_proj"), qkv):
                t[f"{a}self_attn.{proj}.weight"] = (f"{b}attn.qkv.weight", False, rows)
                t[f"{a}self_attn.{proj}.bias"] = (f"{b}attn.qkv.bias", False, rows)
            for proj, rows in zip(("gate_proj", "up_proj"), gate_up):
                t[f"{a}mlp.{proj}.weight"] = (f"{b}mlp.fc.weight", False, rows)
            t[f"{a}self_attn.o_proj.weight"] = (f"{b}attn.out_proj.weight", False)
            t[f"{a}mlp.down_proj.weight"] = (f"{b}mlp.proj.weight", False)
            t[f"{a}input_layernorm.weight"] = (f"{b}norm1.weight", False)
            t[f"{a}post_attention_layernorm.weight"] = (f"{b}norm2.weight", False)
        return HFImport(config=cfg, tensors=t, prefix="model.", outside_prefix=("lm_head.weight",),
                        tied_head="lm_head.weight" if tied else None)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("importer", "qwen2", qwen2)
'''


@pytest.mark.skipif(not hasattr(transformers, "Qwen2ForCausalLM"), reason="this transformers has no Qwen2")
def test_a_family_added_with_one_plugin_file(tmp_path):
    cfg = transformers.Qwen2Config(**dict(LLAMA, num_key_value_heads=2))
    hf = randomise_hf_(transformers.Qwen2ForCausalLM(cfg), seed=2).eval()
    assert hf.model.layers[0].self_attn.q_proj.bias is not None and hf.model.layers[0].self_attn.o_proj.bias is None
    checkpoint_dir = tmp_path / "qwen2"
    hf.save_pretrained(checkpoint_dir)
    with pytest.raises(ConfigError, match="qwen2"):  # no built-in importer reads it
        GPTModel.from_hf(checkpoint_dir)

    write_plugin(tmp_path / "my_plugins", "import_qwen2.py", QWEN2_PLUGIN)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path / "my_plugins"])
    assert "qwen2" in system.registry.names("importer")
    ours = GPTModel.from_hf(checkpoint_dir, plugins=system).eval()
    assert ours.config.qkv_bias and not ours.config.uses_bias("attn_out") and not ours.config.uses_bias("mlp")
    assert_same_logits_and_greedy(ours, hf, "qwen2 via a plugin")

    # the plugin has no to_hf, yet the model is a Llama with a zero o_proj bias: it exports as one
    assert ours.save_hf(tmp_path / "as_llama", plugins=system) == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as_llama").eval()
    assert_same_logits_and_greedy(ours, back, "qwen2 exported as llama")
