"""Per-layer layouts (``model.layers``): selection rules, a mixed model against one assembled by
hand from uniform models, the causality / gradient / KV-cache sweep over mixed layouts, the counts
that walk the model, strict errors, config hashes and readable table labels."""
from __future__ import annotations

import itertools

import pytest
import torch

from gptlab import ConfigError, GPTModel
from gptlab.config.model import ModelConfig, describe_layers, hashed_model, parameter_parts
from gptlab.plugin.components import PositionalContext
from gptlab.plugin.manager import default_plugins
from gptlab.results.frame import table_config

from helpers import ATTENTIONS, TINY, randomize_, sweep, tiny_cfg


def chosen(layers, n_layers=8):
    cfg = ModelConfig.from_any(tiny_cfg(n_layers=n_layers, layers=layers))
    return [{k: v.to_plain() for k, v in spec.items() if v != getattr(cfg, k)} for spec in cfg.layer_specs()]


def test_rules_select_layers_by_index_range_and_period_and_later_rules_win():
    specs = chosen([{"every": 4, "offset": 3, "position": "none"}, {"from": -2, "activation": "relu2"},
                    {"at": [0, -1], "norm": "rmsnorm"}, {"from": 1, "to": 3, "activation": "swiglu"},
                    {"at": 2, "activation": "silu"}])
    assert specs == [{"norm": "rmsnorm"}, {"activation": "swiglu"}, {"activation": "silu"}, {"position": "none"},
                     {}, {}, {"activation": "relu2"},
                     {"position": "none", "activation": "relu2", "norm": "rmsnorm"}]


@pytest.mark.parametrize("layers, message", [
    ([{"every": 4, "offset": 3}], r"model.layers\[0\] sets no component"),
    ([{"at": 9, "position": "none"}], r"model.layers\[0\].at=9 is outside the model's 8 layers"),
    ([{"evry": 2, "position": "none"}], r"unknown model.layers\[0\] key 'evry' \(did you mean 'every'\?\)"),
    ([{"every": 2, "offset": 2, "position": "none"}], r"model.layers\[0\].offset must be an integer in \[0, every\)"),
    ([{"from": 5, "to": 3, "position": "none"}], r"model.layers\[0\] selects no layer of the model's 8"),
    (["rope"], r"model.layers\[0\] must be a mapping"),
    ([{"at": 1, "attention": {"window": 4}}], r"model.layers\[0\].attention: a mapping needs a 'name' key"),
])
def test_bad_rules_are_one_line_errors_naming_the_rule(layers, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_any(tiny_cfg(n_layers=8, layers=layers))


@pytest.mark.parametrize("layers, message", [
    ([{"at": 1, "attention": {"name": "sdpa", "windw": 3}}], "layer 1: attention 'sdpa' has no option 'windw'"),
    ([{"at": 1, "position": "learned"}], "layer 1: position 'learned' adds embeddings at the input"),
    ([{"at": 0, "activation": "gelu2"}], "layer 0: unknown activation 'gelu2'"),
])
def test_a_layers_components_are_checked_like_the_models(layers, message):
    with pytest.raises(ConfigError, match=message):
        GPTModel(tiny_cfg(n_layers=4, position="rope", layers=layers))


def test_a_mixed_model_equals_one_assembled_by_hand():
    """Layers 0-2: windowed attention under RoPE; layer 3: no position (NoPE) and ReLU^2."""
    layers = [{"to": 3, "attention": {"name": "sdpa", "window": 4}},
              {"at": 3, "position": "none", "activation": "relu2"}]
    mixed = GPTModel(tiny_cfg(n_layers=4, position="rope", layers=layers)).eval()
    randomize_(mixed, seed=3)
    local = GPTModel(tiny_cfg(n_layers=4, position="rope", attention={"name": "sdpa", "window": 4})).eval()
    nope = GPTModel(tiny_cfg(n_layers=4, position="none", activation="relu2")).eval()
    weights = mixed.state_dict()
    local.load_state_dict(weights)
    nope.load_state_dict(weights)
    idx = torch.randint(0, TINY["vocab_size"], (2, 14))
    with torch.no_grad():
        x = local.tok_emb(idx)
        for block in local.blocks[:3]:
            x = block(x, local.position.context(0, 14, x.device, x.dtype))
        x = nope.blocks[3](x, PositionalContext(0, 14))
        want = local.head(local.final_norm(x))
        assert torch.allclose(mixed(idx), want, atol=1e-6)
        assert not torch.allclose(local(idx), want, atol=1e-3)  # the layout matters: a uniform model differs


def mixed_layouts(attention: str) -> list[tuple[str, list]]:
    return [
        ("local-global", [{"to": 3, "attention": {"name": attention, "window": 3}}]),
        ("nope-every-2nd", [{"every": 2, "offset": 1, "position": "none"}]),
        ("mixed-mlp-and-placement", [{"at": -1, "activation": "swiglu"}, {"at": 0, "norm_placement": "post"},
                                     {"at": 1, "norm": "rmsnorm"}]),
        ("qk-norm-softcap-moe", [{"every": 2, "attention": {"name": attention, "qk_norm": "rmsnorm", "softcap": 5.0}},
                                 {"at": 1, "activation": {"name": "moe", "n_experts": 4, "top_k": 2}}]),
    ]


def test_the_causality_gradient_and_cache_sweep_covers_mixed_layouts():
    cases = [(f"{attention}/{position}/{label}", tiny_cfg(n_layers=4, attention=attention, position=position,
                                                         layers=layers))
             for attention, position in itertools.product(ATTENTIONS, ["learned", "rope", "alibi", "none"])
             for label, layers in mixed_layouts(attention)]
    failures, count = sweep(default_plugins(), cases), len(cases)
    assert count == 32 and not failures, "\n".join(failures)


def test_counts_walk_every_layer():
    layers = [{"at": -1, "activation": "swiglu"}, {"every": 2, "norm": "rmsnorm"},
              {"at": 0, "activation": {"name": "moe", "n_experts": 4}}, {"to": 2, "attention": {"name": "sdpa",
                                                                                              "window": 4}}]
    cfg = ModelConfig.from_any(tiny_cfg(n_layers=4, position="rope", layers=layers))
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert sum(parameter_parts(cfg, default_plugins()).values()) == model.num_parameters()
    T, c = 16, cfg
    keys = 2 * 4 + 2 * 16  # two windowed layers see 4 keys, two global ones all 16
    assert model.flops_per_token(T) == 6 * model.active_parameters() + 12 * c.n_heads * c.head_size * keys


def test_a_layout_is_hashed_only_when_set_and_labelled_in_words():
    plain = ModelConfig.from_any(tiny_cfg()).to_dict()
    assert "layers" not in hashed_model(plain)
    layers = [{"every": 4, "offset": 3, "position": "none"}, {"to": 3, "attention": {"name": "sdpa", "window": 16}}]
    assert hashed_model({**plain, "layers": layers})["layers"] == layers
    assert describe_layers(layers, 8) == ("layers 3,7: position=none; layers 0-2: attention=sdpa(window=16)")
    cells = table_config({"model": {**plain, "n_layers": 8, "layers": layers}, "data": {}, "train": {}})
    assert cells["model.layers"] == "layers 3,7: position=none; layers 0-2: attention=sdpa(window=16)"
    assert table_config({"model": plain, "data": {}, "train": {}})["model.layers"] == "uniform"
