"""Strict model config: unknown keys, wrong types and bad values fail with the key named."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import gptlab
from gptlab import ComponentSpec, ConfigError, GPTModel, ModelConfig

from helpers import TINY, tiny_cfg


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        GPTModel(cfg)
    msg = str(err.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


def test_unknown_key_suggests_the_right_one():
    msg = _error(tiny_cfg(n_head=4))
    assert "'n_head'" in msg and "did you mean 'n_heads'" in msg
    msg = _error(tiny_cfg(dropout=0.1))
    assert "'dropout'" in msg


@pytest.mark.parametrize("key, value", [
    ("n_layers", "12"), ("n_layers", 2.5), ("n_layers", True), ("vocab_size", None), ("emb_dim", 32.0),
    ("qkv_bias", "yes"), ("qkv_bias", 1), ("tie_embeddings", "false"), ("gradient_checkpointing", 0),
    ("drop_rate", "x"), ("drop_rate", True), ("ff_dim", "128"), ("ff_dim", 12.5),
])
def test_wrong_types_name_the_key(key, value):
    msg = _error(tiny_cfg(**{key: value}))
    assert key in msg


@pytest.mark.parametrize("key, value", [
    ("n_layers", 0), ("n_heads", -1), ("context_length", 0), ("drop_rate", 1.0), ("drop_rate", -0.1),
    ("ff_dim", 0),
])
def test_bad_values_name_the_key(key, value):
    assert key in _error(tiny_cfg(**{key: value}))


def test_emb_dim_must_divide_by_heads():
    msg = _error(tiny_cfg(emb_dim=30, n_heads=4))
    assert "emb_dim" in msg and "n_heads" in msg


def test_component_as_mapping_with_options():
    model = GPTModel(tiny_cfg(position={"name": "rope", "base": 500}))
    assert model.components["position"] == "rope"
    assert model.position.base == 500.0
    d = TINY["emb_dim"] // TINY["n_heads"]
    expected = torch.tensor([500.0 ** (-i / d) for i in range(0, d, 2)])
    torch.testing.assert_close(model.position.inv_freq, expected)
    assert model.config.position == ComponentSpec("rope", {"base": 500})


def test_component_mapping_needs_a_name():
    assert "position" in _error(tiny_cfg(position={"base": 500}))
    assert "attention" in _error(tiny_cfg(attention={"name": "", "n_kv_heads": 2}))
    assert "norm" in _error(tiny_cfg(norm=3))


def test_omegaconf_config_works():
    cfg = OmegaConf.create(tiny_cfg(position={"name": "rope", "base": 500}, norm="rmsnorm",
                                    attention={"name": "vanilla", "n_kv_heads": 2}))
    model = GPTModel(cfg)
    assert model.components == {"attention": "vanilla", "position": "rope", "norm": "rmsnorm",
                                "norm_placement": "pre", "activation": "gelu"}
    assert model.position.base == 500.0
    assert model.blocks[0].attn.n_kv_heads == 2
    # interpolations are resolved
    cfg = OmegaConf.create(dict(tiny_cfg(), ff_dim="${emb_dim}"))
    assert GPTModel(cfg).blocks[0].mlp.hidden_dim == TINY["emb_dim"]
    # and OmegaConf errors are ConfigErrors too
    with pytest.raises(ConfigError, match="n_head"):
        GPTModel(OmegaConf.create(tiny_cfg(n_head=4)))


def test_dataclass_config_and_round_trip():
    cfg = ModelConfig.from_any(tiny_cfg(position={"name": "rope", "base": 500}, activation="swiglu",
                                        tie_embeddings=False))
    assert isinstance(cfg.position, ComponentSpec)
    plain = cfg.to_dict()
    assert plain["position"] == {"name": "rope", "base": 500} and plain["activation"] == "swiglu"
    assert ModelConfig.from_any(plain) == cfg
    model = GPTModel(cfg)
    assert model.config == cfg and model.config is not cfg
    assert model.head.weight is not model.tok_emb.weight


def test_defaults_are_the_seed_model():
    cfg = ModelConfig()
    for key, value in gptlab.GPT_CONFIG_124M.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.attention.name, cfg.position.name, cfg.norm.name, cfg.norm_placement.name,
            cfg.activation.name) == ("sdpa", "learned", "layernorm", "pre", "gelu")
    assert cfg.tie_embeddings is True and cfg.gradient_checkpointing is False
    assert cfg.head_dim is None and cfg.head_size == 64  # unset: emb_dim / n_heads
    assert ModelConfig.from_any({"emb_dim": 96, "n_heads": 4, "head_dim": 16}).head_size == 16


def test_keys_added_later_keep_old_config_hashes():
    # a run made before head_dim, embedding_norm and the bias switches existed hashed this dict
    from gptlab.run.experiment import config_hash
    old = {k: v for k, v in ModelConfig().to_dict().items()
           if k not in ("head_dim", "embedding_norm", "attn_out_bias", "mlp_bias", "norm_bias", "vocab_multiple")}
    resolved = {"model": ModelConfig().to_dict(), "data": {}, "train": {}}
    assert config_hash(resolved) == config_hash({"model": old, "data": {}, "train": {}})
    for key, value in [("head_dim", 64), ("embedding_norm", True), ("attn_out_bias", True), ("mlp_bias", False),
                       ("norm_bias", True), ("vocab_multiple", 64)]:
        changed = {**resolved, "model": {**resolved["model"], key: value}}
        assert config_hash(changed) != config_hash(resolved), key


def test_non_mapping_config_is_an_error():
    with pytest.raises(ConfigError):
        GPTModel([("n_layers", 2)])
    assert issubclass(ConfigError, ValueError)  # documented: callers may catch ValueError


def test_bias_switch_removes_every_non_qkv_bias():
    model = GPTModel(tiny_cfg(bias=False))
    biased = [n for n, p in model.named_parameters() if n.endswith("bias")]
    assert biased == []
    model = GPTModel(tiny_cfg(bias=False, qkv_bias=True))
    assert [n for n, _ in model.named_parameters() if n.endswith("bias")] == [
        f"blocks.{i}.attn.qkv.bias" for i in range(TINY["n_layers"])]


def test_dataclass_config_is_checked_like_a_dict():
    """GPTModel(ModelConfig(...)) gets the same checks as a dict: a dataclass can be built with any
    values, so without them bad values would surface later as RuntimeError/AttributeError."""
    with pytest.raises(ConfigError, match="divisible"):
        GPTModel(ModelConfig(**dict(TINY, emb_dim=30)))
    with pytest.raises(ConfigError, match="n_layers"):
        GPTModel(ModelConfig(**dict(TINY, n_layers="2")))
    # a plain name where a ComponentSpec belongs is coerced, exactly as in a dict
    model = GPTModel(ModelConfig(**dict(TINY, position="rope")))
    assert model.components["position"] == "rope" and model.config.position == gptlab.ComponentSpec("rope")
    with pytest.raises(ConfigError, match="model.position"):
        GPTModel(ModelConfig(**dict(TINY, position=3)))


def test_readme_example_experiment_states_the_real_defaults(tmp_path):
    """The README's experiment example says every data and train key shows its default: check it."""
    import re

    import yaml

    from gptlab.config.model import to_plain
    from gptlab.run.experiment import load_experiment
    from gptlab.config.run import DataConfig, TrainConfig

    from helpers import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(name: preln_vs_postln.*?)```", readme, re.S)[1]
    doc = yaml.safe_load(block)
    assert doc["train"] == to_plain(TrainConfig()) and doc["data"] == to_plain(DataConfig())
    path = tmp_path / "example.yaml"
    path.write_text(block)
    exp = load_experiment(path)
    assert len(exp.runs) == 3 * 2 * 3 and exp.warnings == []  # variants x grid x seeds, nothing suspicious
