"""`gptlab export` and the model ideas: a layout, an output soft-cap or cross-layer wiring fit no
Hugging Face family and are refused naming what does not fit; a z-loss (a training term) exports."""
from __future__ import annotations

import json

import pytest
import torch

import gptlab
from gptlab import ConfigError, GPTModel
from gptlab.hf.checkpoint import export_hf

BASE = {**gptlab.PRESETS["nano"], "n_layers": 4, "emb_dim": 32, "n_heads": 4}


@pytest.mark.parametrize("extra, message", [
    ({"layers": [{"every": 2, "offset": 1, "position": "none"}]},
     "model.layers: layer 1 has position 'none' where the model has 'learned'; no Hugging Face family"),
    ({"layers": [{"at": -1, "activation": "relu"}]},
     "model.layers: layer 3 has activation 'relu' where the model has 'gelu'"),
    ({"logit_softcap": 10.0}, "gpt2: exporting as gpt2 would change model.logit_softcap"),
    ({"wiring": "unet"}, "gpt2: wiring 'unet': a gpt2 checkpoint holds 'sequential'"),
    ({"attention": {"name": "sdpa", "window": 8}}, "gpt2: attention 'sdpa' option window: GPT-2 has no equivalent"),
    ({"attention": "value_embed"}, "value_embed"),
])
def test_ideas_no_family_holds_are_refused_and_nothing_is_written(tmp_path, extra, message):
    out = tmp_path / "hf"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_hf(GPTModel({**BASE, **extra}), out)
    assert not out.exists() or not any(out.iterdir())


def test_a_z_loss_model_exports_as_gpt2_with_the_same_logits(tmp_path):
    import transformers  # a dev dependency: installed wherever the tests run

    torch.manual_seed(0)
    model = GPTModel({**BASE, "z_loss": 1e-4, "drop_rate": 0.0}).eval()
    assert export_hf(model, tmp_path) == "gpt2"
    assert "z_loss" not in json.loads((tmp_path / "config.json").read_text())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, BASE["vocab_size"], (1, 12))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, model(idx), atol=1e-4)
