"""Loading Hugging Face GPT-2 checkpoints: logits and greedy tokens match transformers exactly
enough, and every way a directory can be wrong ends in a ConfigError that names the problem."""
import json
import shutil

import pytest
import torch

import transformers  # noqa: E402  (the dev extra; CI installs it)
from safetensors.torch import load_file, save_file  # noqa: E402

from gptlab import ConfigError, GPTModel  # noqa: E402
from gptlab.builtin_plugins.import_gpt2 import config_from_hf  # noqa: E402

TINY = dict(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
            initializer_range=0.2)  # wider than GPT-2's 0.02 so greedy decoding does not just repeat a token


def make_hf(**overrides):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**dict(TINY, **overrides))
    return transformers.GPT2LMHeadModel(cfg).eval()


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours, hf, idx):
    with torch.no_grad():
        return (ours(idx) - hf(idx).logits).abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny HF model saved as safetensors, shared by the read-only tests."""
    hf = make_hf()
    directory = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(directory)
    return hf, directory


def copy_config(src, dst, **changes):
    dst.mkdir(exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_logits_and_greedy_tokens_match_transformers(saved):
    hf, directory = saved
    assert (directory / "model.safetensors").is_file()
    model = GPTModel.from_hf_gpt2(directory).eval()
    assert model.components["activation"] == "gelu_tanh"
    idx = tokens()
    assert max_logit_diff(model, hf, idx) < 1e-4

    ours = model.generate(idx, 10, temperature=0)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, idx.shape[1]:].tolist())) > 1  # a real sequence, not one token repeated


def test_parameter_count_matches(saved):
    hf, directory = saved
    model = GPTModel.from_hf_gpt2(directory)
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert model.head.weight is model.tok_emb.weight


def test_exact_gelu_checkpoint(tmp_path):
    hf = make_hf(activation_function="gelu")
    hf.save_pretrained(tmp_path)
    model = GPTModel.from_hf_gpt2(tmp_path).eval()
    assert model.components["activation"] == "gelu"
    assert max_logit_diff(model, hf, tokens()) < 1e-4


def test_pickle_checkpoint_loads_with_weights_only(saved, tmp_path):
    hf, directory = saved
    copy_config(directory, tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # includes the tied lm_head.weight
    model = GPTModel.from_hf_gpt2(tmp_path).eval()
    assert max_logit_diff(model, hf, tokens()) < 1e-4


def test_sharded_safetensors_and_unprefixed_keys(saved, tmp_path):
    hf, directory = saved
    state = load_file(directory / "model.safetensors")
    copy_config(directory, tmp_path)
    names = sorted(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k.removeprefix("transformer."): state[k] for k in keys}, tmp_path / file)
        weight_map.update({k.removeprefix("transformer."): file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = GPTModel.from_hf_gpt2(tmp_path).eval()
    assert max_logit_diff(model, hf, tokens()) < 1e-4


def test_empty_directory_names_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        GPTModel.from_hf_gpt2(tmp_path)
    assert str(tmp_path) in str(err.value) and "config.json" in str(err.value)


def test_config_without_weights_names_directory(saved, tmp_path):
    copy_config(saved[1], tmp_path)
    with pytest.raises(ConfigError, match="model.safetensors") as err:
        GPTModel.from_hf_gpt2(tmp_path)
    assert str(tmp_path) in str(err.value)


def edited_checkpoint(saved, tmp_path, edit):
    directory = copy_config(saved[1], tmp_path)
    state = load_file(saved[1] / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")
    return directory


def test_unexpected_key_is_named(saved, tmp_path):
    def add(state):
        state["transformer.h.0.attn.extra"] = torch.zeros(3)

    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn\.extra"):
        GPTModel.from_hf_gpt2(edited_checkpoint(saved, tmp_path, add))


def test_missing_key_is_named(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"h\.1\.mlp\.c_fc\.bias"):
        GPTModel.from_hf_gpt2(edited_checkpoint(saved, tmp_path, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias")))


def test_wrong_shape_is_named(saved, tmp_path):
    def shrink(state):
        state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"][:, :96].clone()

    with pytest.raises(ConfigError, match=r"c_attn\.weight.*\(48, 96\)"):
        GPTModel.from_hf_gpt2(edited_checkpoint(saved, tmp_path, shrink))


def test_untied_head_is_refused(saved, tmp_path):
    def untie(state):
        state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])

    with pytest.raises(ConfigError, match="lm_head.weight"):
        GPTModel.from_hf_gpt2(edited_checkpoint(saved, tmp_path, untie))


def test_tied_head_and_mask_buffers_are_ignored(saved, tmp_path):
    def add(state):
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
        state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
        state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)

    model = GPTModel.from_hf_gpt2(edited_checkpoint(saved, tmp_path, add)).eval()
    assert max_logit_diff(model, saved[0], tokens()) < 1e-4


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True),
                                        ("reorder_and_upcast_attn", True),
                                        ("scale_attn_weights", False),
                                        ("activation_function", "relu")])
def test_unsupported_config_is_named(saved, tmp_path, key, value):
    directory = copy_config(saved[1], tmp_path, **{key: value})
    shutil.copy(saved[1] / "model.safetensors", directory)
    with pytest.raises(ConfigError, match=key) as err:
        GPTModel.from_hf_gpt2(directory)
    assert "config.json" in str(err.value)
    if key == "activation_function":
        assert "relu" in str(err.value)


def test_config_mapping():
    hf = dict(TINY, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-6, n_inner=100, resid_pdrop=0.2)
    del hf["n_positions"]
    hf["n_ctx"] = 16
    cfg = config_from_hf(hf)
    assert cfg["norm"] == {"name": "layernorm", "eps": 1e-6}
    assert cfg["activation"] == "gelu_tanh" and cfg["ff_dim"] == 100
    assert cfg["context_length"] == 16 and cfg["drop_rate"] == 0.2
    assert config_from_hf(TINY)["norm"] == "layernorm" and "ff_dim" not in config_from_hf(TINY)


def test_n_inner_and_eps_load(tmp_path):
    hf = make_hf(n_inner=80, layer_norm_epsilon=1e-6)
    hf.save_pretrained(tmp_path)
    model = GPTModel.from_hf_gpt2(tmp_path).eval()
    assert model.blocks[0].mlp.hidden_dim == 80 and model.final_norm.eps == 1e-6
    assert max_logit_diff(model, hf, tokens()) < 1e-4


class NotATensor:
    pass


def test_pickle_with_objects_is_refused_not_unpickled(saved, tmp_path):
    copy_config(saved[1], tmp_path)
    torch.save({"transformer.wte.weight": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        GPTModel.from_hf_gpt2(tmp_path)
