"""``model.vocab_multiple``: the embedding and head padded for aligned GPU matmuls, invisible
everywhere else (logits, loss, import and export to Hugging Face, the seed API's counts)."""
from __future__ import annotations

import pytest
import torch
import transformers

from gptlab import GPT_CONFIG_124M, GPTModel
from gptlab.config.model import ModelConfig
from gptlab.errors import ConfigError

TINY = dict(vocab_size=250, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
            qkv_bias=True, activation="gelu_tanh")


def test_padded_rows_and_defaults():
    """Rows round up to the multiple; off by default, so the seeds' GPT-124M keeps its count."""
    assert ModelConfig.from_any({**TINY, "vocab_multiple": 64}).padded_vocab == 256
    assert ModelConfig.from_any({**TINY, "vocab_multiple": 50}).padded_vocab == 250  # already a multiple
    assert ModelConfig.from_any(TINY).padded_vocab == 250
    with torch.device("meta"):
        assert GPTModel(GPT_CONFIG_124M).num_parameters() == 124_412_160
        assert GPTModel({**GPT_CONFIG_124M, "vocab_multiple": 64}).num_parameters() == 124_412_160 + 47 * 768
    with pytest.raises(ConfigError, match="vocab_multiple"):
        ModelConfig.from_any({**TINY, "vocab_multiple": 0})


def test_padded_model_computes_the_unpadded_function():
    """Same weights in the real rows: identical logits and loss, padded or not."""
    torch.manual_seed(0)
    plain = GPTModel(TINY).eval()
    padded = GPTModel({**TINY, "vocab_multiple": 64}).eval()
    state = {k: v for k, v in plain.state_dict().items()}
    with torch.no_grad():
        for name, p in padded.named_parameters():
            src = state[name]
            p[:src.shape[0]].copy_(src)
            if p.shape[0] > src.shape[0]:
                p[src.shape[0]:].fill_(5.0)  # large: they would dominate if they were not masked
    x = torch.randint(0, 250, (2, 16))
    y = torch.randint(0, 250, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(padded(x), plain(x), atol=1e-5, rtol=0)
        assert padded(x).shape[-1] == 250
        torch.testing.assert_close(padded(x, targets=y), plain(x, targets=y), atol=1e-5, rtol=0)


def test_export_drops_the_padding_and_import_restores_it(tmp_path):
    """A padded model exports a 250-row GPT-2 checkpoint that transformers computes identically;
    importing it into a padded config puts the rows back, padding zeroed."""
    torch.manual_seed(1)
    model = GPTModel({**TINY, "vocab_multiple": 64}).eval()
    assert model.save_hf(tmp_path / "hf") == "gpt2"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.vocab_size == 250
    x = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), atol=1e-5, rtol=0)
    back = GPTModel.from_hf(tmp_path / "hf")  # as published: no padding
    assert back.tok_emb.weight.shape[0] == 250
    from gptlab.hf.checkpoint import load_hf_weights
    from gptlab.plugin.manager import default_plugins

    repadded = GPTModel({**back.config.to_dict(), "vocab_multiple": 64})
    load_hf_weights(repadded, tmp_path / "hf", default_plugins())
    assert repadded.tok_emb.weight.shape[0] == 256
    assert torch.count_nonzero(repadded.tok_emb.weight[250:]) == 0
    with torch.no_grad():
        torch.testing.assert_close(repadded.eval()(x), model(x), atol=1e-5, rtol=0)
