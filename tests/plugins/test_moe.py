"""The Mixture-of-Experts feed-forward plugin ('moe'): routing and combination against a per-token
loop, causality and the KV cache, balancing (auxiliary loss and bias), active parameters and FLOPs,
a run whose val_loss is the plain next-token loss, and Muon on its stacked expert matrices."""
from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest
import torch

import gptlab
from gptlab import ConfigError, GPTModel
from gptlab.config.model import ModelConfig
from gptlab.config.run import DataConfig
from gptlab.data.tokens import prepare_tokens
from gptlab.plugin.components import pop_aux_losses
from gptlab.train.loop import evaluate

from helpers import REPO_ROOT, run_subprocess, write_lab

BASE = {**gptlab.PRESETS["nano"], "n_layers": 2, "emb_dim": 32, "n_heads": 4, "drop_rate": 0.0,
        "context_length": 64}


def moe_layer(seed: int = 0, **options):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_any({**BASE, "activation": {"name": "moe", **options}})
    return GPTModel(cfg).blocks[0].mlp.eval()


def per_token_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own: gate, pick the top k, renormalise, sum the chosen experts' outputs."""
    out = torch.zeros_like(x)
    for n, token in enumerate(x):
        logits = layer.router.weight @ token
        probs = torch.softmax(logits, -1) if layer.gate == "softmax" else torch.sigmoid(logits)
        chosen = torch.topk(probs, layer.k).indices
        weights = probs[chosen]
        if layer.k > 1 or layer.gate == "sigmoid":
            weights = weights / weights.sum()
        for e, w in zip(chosen.tolist(), weights):
            out[n] += w * (layer.w_out[e] @ layer.act(layer.w_in[e] @ token))  # (out, in) matrices
        if layer.shared is not None:
            out[n] += layer.shared(token[None])[0]
    return out


@pytest.mark.parametrize("options", [
    {"n_experts": 4, "top_k": 2}, {"n_experts": 6, "top_k": 1, "gate": "sigmoid"},
    {"n_experts": 4, "top_k": 3, "shared_expert": True, "activation": "relu2"},
])
def test_routing_and_combination_equal_a_per_token_loop(options):
    layer = moe_layer(**options)
    x = torch.randn(3, 7, BASE["emb_dim"])
    want = per_token_reference(layer, x.reshape(-1, BASE["emb_dim"])).view_as(x)
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_a_moe_model_is_causal_and_its_kv_cache_is_exact():
    torch.manual_seed(0)
    model = GPTModel({**BASE, "activation": {"name": "moe", "n_experts": 4, "top_k": 2}}).eval()
    x = torch.randint(0, 256, (2, 30))
    full = model(x)
    cache = model.new_cache(30)
    parts = [model(x[:, :20], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(20, 30)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    later = x.clone()
    later[:, 15:] = (later[:, 15:] + 3) % 256
    assert torch.equal(model(later)[:, :15], full[:, :15])


def load(layer, x) -> torch.Tensor:
    idx = layer.route(x.reshape(-1, x.shape[-1]))[2]
    return torch.bincount(idx.reshape(-1), minlength=layer.n_experts).float()


def skewed(layer) -> None:
    with torch.no_grad():  # a router that sends nearly everything to expert 0
        layer.router.weight.normal_(0, 0.02)
        layer.router.weight[0] += 0.1


def toy_tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(512, BASE["emb_dim"]) + 0.3


def test_the_balancing_loss_evens_the_expert_load():
    x = toy_tokens()
    layer = moe_layer(n_experts=4, top_k=1, balance="aux", balance_weight=1.0, router_z_loss=0.0)
    skewed(layer)
    before = load(layer, x)
    assert before.max() / before.mean() > 2.5
    layer.train()
    opt = torch.optim.SGD(layer.router.parameters(), lr=0.1)
    for _ in range(200):
        layer(x[None])
        loss, weight = pop_aux_losses(layer)["moe_balance"]
        opt.zero_grad()
        (weight * loss).backward()
        opt.step()
    after = load(layer.eval(), x)
    assert after.max() / after.mean() < 1.3 < before.max() / before.mean()


def test_bias_balancing_evens_the_load_without_any_loss():
    x = toy_tokens()
    layer = moe_layer(n_experts=4, top_k=1, balance="bias", bias_rate=1e-3, router_z_loss=0.0)
    skewed(layer)
    before = load(layer, x)
    layer.train()
    with torch.no_grad():
        for _ in range(400):
            layer(x[None])
            layer.gptlab_after_step()  # what gptlab's training step calls after the optimizer step
    assert all(weight is None for _, weight in pop_aux_losses(layer).values())  # diagnostics only: no loss term
    after = load(layer.eval(), x)
    assert after.max() / after.mean() < 1.3 < before.max() / before.mean()
    assert layer.load_bias.abs().sum() > 0


def test_active_parameters_and_flops_count_only_the_chosen_experts():
    torch.manual_seed(0)
    model = GPTModel({**BASE, "activation": {"name": "moe", "n_experts": 8, "top_k": 2}})
    layer = model.blocks[0].mlp
    per_expert = layer.w_in[0].numel() + layer.w_out[0].numel()
    assert model.num_parameters(exclude_position=True) - model.active_parameters() == BASE["n_layers"] * 6 * per_expert
    T = 16
    attn = 12 * BASE["n_layers"] * BASE["n_heads"] * (BASE["emb_dim"] // BASE["n_heads"]) * T
    assert model.flops_per_token(T) == 6 * model.active_parameters() + attn
    # the default expert width gives a token the dense 4x MLP's matmul FLOPs
    assert layer.expert_dim * 2 == 4 * BASE["emb_dim"]


@pytest.mark.parametrize("bad, message", [
    ({"top_k": 5, "n_experts": 4}, "top_k=5 is more than n_experts=4"),
    ({"gate": "relu"}, "option gate must be one of softmax, sigmoid"),
    ({"balance": "loss"}, "option balance must be one of aux, bias, none"),
    ({"n_experts": 0}, "option n_experts must be an integer >= 1"),
])
def test_bad_moe_options_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        GPTModel({**BASE, "activation": {"name": "moe", **bad}})


def test_muon_orthogonalises_each_expert_matrix_on_its_own():
    spec = importlib.util.spec_from_file_location("optim_muon", REPO_ROOT / "plugins" / "optim_muon.py")
    muon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(muon)
    stacked = torch.randn(3, 8, 20)
    together = muon.orthogonalize(stacked, 5)
    for e in range(3):
        assert torch.allclose(together[e], muon.orthogonalize(stacked[e], 5), atol=1e-6)


def test_a_moe_run_trains_logs_its_aux_losses_and_its_val_loss_is_the_next_token_loss(tmp_path):
    exp = {"name": "moe", "model": {**{k: BASE[k] for k in ("n_layers", "emb_dim", "n_heads", "drop_rate")},
                                    "preset": "nano", "activation": {"name": "moe", "n_experts": 4, "top_k": 2}},
           "train": {"steps": 10, "batch_size": 4, "eval_every": 5, "eval_batches": 2, "log_every": 5,
                     "checkpoint": True, "optimizer": "muon", "lr": 0.02},
           "seeds": [0]}
    write_lab(tmp_path, exp)
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "moe").glob("*__s0")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux/moe_balance"] >= 1.0 and r["aux/router_z"] > 0 for r in rows)  # E sum f P >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    model = GPTModel.from_run(run_dir)
    layer = model.blocks[0].mlp
    skipped = BASE["n_layers"] * 2 * (layer.w_in[0].numel() + layer.w_out[0].numel())  # 2 of 4 experts unused
    assert summary["parameters"] == model.num_parameters()
    assert summary["active_parameters"] == summary["parameters"] - skipped
    data = prepare_tokens(DataConfig(), gptlab.default_plugins(), tmp_path / ".cache")
    val = evaluate(model, data.val, model.config.context_length, 2, 4, torch.device("cpu"), contextlib.nullcontext)
    assert val == pytest.approx(summary["final_val_loss"], abs=1e-6)
