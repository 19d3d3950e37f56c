"""Attention options every built-in attention takes (QK-norm, score soft-cap, sliding window), the
``transform_qkv`` seam, the output soft-cap and z-loss, and the auxiliary-loss channel.

Each option is checked against a reference written here from its definition, and across both
kernels (vanilla and sdpa), every position scheme, the KV cache and causality.
"""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

import gptlab
from gptlab import ConfigError, GPTModel
from gptlab.config.model import ModelConfig, hashed_model
from gptlab.config.run import DataConfig
from gptlab.data.tokens import prepare_tokens
from gptlab.train.loop import evaluate
from gptlab.plugin.components import PositionalContext, aux_loss, pop_aux_losses

from helpers import run_subprocess, write_lab

BASE = {**gptlab.PRESETS["nano"], "n_layers": 2, "emb_dim": 32, "n_heads": 4, "drop_rate": 0.0,
        "context_length": 64}
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def build(seed: int = 0, **changes) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel({**BASE, **changes}).eval()


def reference_attention(attn, x: torch.Tensor, *, softcap=None, window=None, qk_norm=None) -> torch.Tensor:
    """One attention layer with no position scheme, written from the definitions."""
    B, T, _ = x.shape
    H, D = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([H * D] * 3, dim=-1)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
    if qk_norm:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + torch.finfo(q.dtype).eps) * attn.q_norm.weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + torch.finfo(k.dtype).eps) * attn.k_norm.weight
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (j <= i) & ((j > i - window) if window else True)
    y = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1) @ v
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("kernel", ["vanilla", "sdpa"])
@pytest.mark.parametrize("options", [{"window": 5}, {"softcap": 2.0}, {"qk_norm": "rmsnorm"},
                                     {"qk_norm": "rmsnorm", "softcap": 3.0, "window": 7}])
def test_each_option_equals_its_definition(kernel, options):
    model = build(position="none", attention={"name": kernel, **options})
    attn = model.blocks[0].attn
    if "qk_norm" in options:
        with torch.no_grad():  # a gain that is not all ones, so the reference must apply it
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 20, BASE["emb_dim"])
    ctx = PositionalContext(0, 20)
    want = reference_attention(attn, x, **options)
    assert torch.allclose(attn(x, ctx), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_both_kernels_agree_and_the_cache_and_causality_hold_with_every_position(position):
    options = {"qk_norm": "layernorm", "softcap": 4.0, "window": 6}
    x = torch.randint(0, 256, (2, 40))
    outs = {}
    for kernel in ("vanilla", "sdpa"):
        model = build(position=position, attention={"name": kernel, **options})
        full = model(x)
        cache = model.new_cache(40)
        parts = [model(x[:, :25], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(25, 40)]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)  # the cache honours the window
        later = x.clone()
        later[:, 30:] = (later[:, 30:] + 7) % 256
        assert torch.equal(model(later)[:, :30], full[:, :30])  # position t never sees a later token
        outs[kernel] = full
    assert torch.allclose(outs["vanilla"], outs["sdpa"], atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_a_window_bounds_how_far_back_a_token_reaches(position):
    window, layers = 4, BASE["n_layers"]
    model = build(position=position, attention={"name": "sdpa", "window": window})
    x = torch.randint(0, 256, (1, 30))
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 256
    delta = (model(changed) - model(x)).abs().amax(-1)[0]
    reach = layers * (window - 1)  # each layer looks window - 1 tokens further back
    assert delta[reach] > 0 and torch.all(delta[reach + 1:] == 0)


def test_qk_norm_gains_are_declared_norm_parameters_and_can_be_dropped():
    model = build(attention={"name": "sdpa", "qk_norm": "rmsnorm"})
    names = dict(model.named_parameters())
    assert names["blocks.0.attn.q_norm.weight"].shape == (BASE["emb_dim"] // BASE["n_heads"],)
    assert model.blocks[0].attn.param_names["q_norm"] == "q_norm"
    plain = build(attention={"name": "sdpa", "qk_norm": "rmsnorm", "qk_norm_scale": False})
    assert not any("q_norm" in n for n, _ in plain.named_parameters())
    assert plain.num_parameters() == build().num_parameters()
    from gptlab.train.recipe import param_infos
    from gptlab.config.run import TrainConfig

    infos = {i.name: i for i in param_infos(model, TrainConfig())}
    assert infos["blocks.0.attn.k_norm.weight"].norm and infos["blocks.0.attn.k_norm.weight"].role == "scalars"


@pytest.mark.parametrize("bad, message", [
    ({"qk_norm": "batchnorm"}, "qk_norm must be rmsnorm or layernorm"),
    ({"window": 0}, "option window must be an integer >= 1 or null, got 0"),
    ({"softcap": -1.0}, "option softcap must be a number > 0 or null, got -1.0"),
])
def test_bad_options_are_refused_before_anything_is_built(bad, message):
    with pytest.raises(ConfigError, match=message):
        GPTModel({**BASE, "attention": {"name": "vanilla", **bad}})


def test_transform_qkv_is_the_seam_a_subclass_overrides():
    from gptlab import CausalSelfAttention

    class Doubled(gptlab.plugin.layers.CausalSelfAttention):
        def transform_qkv(self, q, k, v, ctx):
            q, k, v = super().transform_qkv(q, k, v, ctx)
            return q, k, 2 * v

        def attend(self, q, k, v, ctx):
            return torch.softmax(self.scores(q, self.expand_kv(k), ctx), -1) @ self.expand_kv(v)

    assert CausalSelfAttention is gptlab.plugin.layers.CausalSelfAttention
    cfg = ModelConfig.from_any({**BASE, "position": "none"})
    torch.manual_seed(0)
    doubled = Doubled(cfg, qk_norm="rmsnorm")
    x = torch.randn(1, 9, BASE["emb_dim"])
    with torch.no_grad():
        doubled.out_proj.bias.zero_()
        want = 2 * reference_attention(doubled, x, qk_norm="rmsnorm")  # attention is linear in v
    assert torch.allclose(doubled(x, PositionalContext(0, 9)), want, atol=1e-5)


def test_the_output_soft_cap_bounds_the_logits_and_equals_its_definition():
    capped = build(logit_softcap=3.0)
    plain = build()
    x = torch.randint(0, 256, (2, 16))
    logits = capped(x)
    assert logits.abs().max() < 3.0
    assert torch.allclose(logits, 3.0 * torch.tanh(plain(x) / 3.0), atol=1e-6)


def test_the_z_loss_is_added_in_training_only_and_its_gradient_is_the_definitions():
    model = build(z_loss=1e-2).train()
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    loss = model(x, targets=y)
    aux = pop_aux_losses(model)
    logits = model(x).float().reshape(-1, 256)
    pop_aux_losses(model)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(loss, F.cross_entropy(logits, y.reshape(-1)), atol=1e-6)
    assert set(aux) == {"z_loss"} and aux["z_loss"][1] == 1e-2 and torch.allclose(aux["z_loss"][0], z, atol=1e-5)
    model.eval()
    model(x, targets=y)
    assert pop_aux_losses(model) == {}  # evaluation: the next-token loss alone


def test_aux_losses_of_one_name_sum_over_modules_and_one_name_has_one_weight():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    holder = torch.nn.Sequential(a, b).train()
    aux_loss(a, "balance", torch.tensor(1.5), 0.1)
    aux_loss(b, "balance", torch.tensor(2.0), 0.1)
    aux_loss(b, "balance", torch.tensor(0.5), 0.1)
    out = pop_aux_losses(holder)
    assert out["balance"][0].item() == 4.0 and out["balance"][1] == 0.1
    assert pop_aux_losses(holder) == {}  # cleared once read
    aux_loss(a, "x", torch.tensor(1.0), 0.1)
    aux_loss(b, "x", torch.tensor(1.0), 0.2)
    with pytest.raises(ValueError, match="one name, one weight"):
        pop_aux_losses(holder)


def test_new_model_keys_at_their_defaults_keep_existing_hashes():
    plain = ModelConfig().to_dict()
    assert "logit_softcap" not in hashed_model(plain) and "z_loss" not in hashed_model(plain)
    assert "z_loss" in hashed_model({**plain, "z_loss": 1e-4})


# ---------------------------------------------------------------------------------------------
# The auxiliary-loss channel, end to end through `gptlab run`
# ---------------------------------------------------------------------------------------------
PLUGIN = '''
import torch
import gptlab


class Pulled(torch.nn.LayerNorm):
    """A LayerNorm whose output is pulled toward zero by an auxiliary loss."""

    def forward(self, x):
        y = super().forward(x)
        gptlab.aux_loss(self, "pull", y.pow(2).mean(), 0.5)
        return y


def pulled(cfg, dim):
    """LayerNorm with an auxiliary pull-to-zero loss."""
    return Pulled(dim)


@gptlab.hookimpl
def gptlab_register(register):
    register("norm", "pulled", pulled)
'''


def test_a_plugins_aux_loss_is_trained_logged_and_kept_out_of_val_loss(tmp_path):
    exp = {"name": "aux", "plugins": ["pulled.py"],
           "model": {"preset": "nano", "n_layers": 2, "emb_dim": 32, "n_heads": 4, "norm": "pulled",
                     "drop_rate": 0.0},
           "train": {"steps": 12, "batch_size": 4, "eval_every": 6, "eval_batches": 2, "log_every": 3,
                     "grad_accum": 2, "checkpoint": True},
           "seeds": [0]}
    write_lab(tmp_path, exp, plugins={"pulled.py": PLUGIN})
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "aux").glob("*__s0")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("aux/pull" in r and r["aux/pull"] > 0 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["aux_losses"]["pull"] == rows[-1]["aux/pull"]
    # val_loss is the next-token loss of the saved weights, with no auxiliary term in it
    plugins = gptlab.build_plugin_system(extra=[str(tmp_path / "pulled.py")])
    model = GPTModel.from_run(run_dir, plugins=plugins)
    data = prepare_tokens(DataConfig(), plugins, tmp_path / ".cache")
    val = evaluate(model, data.val, model.config.context_length, 2, 4, torch.device("cpu"), contextlib.nullcontext)
    assert pop_aux_losses(model) == {}  # evaluation added none
    assert val == pytest.approx(summary["final_val_loss"], abs=1e-6)
    show = run_subprocess("show", run_dir, cwd=tmp_path, timeout=300)
    assert show.returncode == 0 and "aux pull" in show.stdout
