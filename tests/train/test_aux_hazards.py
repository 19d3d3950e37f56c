"""Auxiliary terms and per-step component state under gradient checkpointing and torch.compile:
the recomputed forward of a checkpointed block adds nothing twice, MoE's balancing bias moves once
per optimizer step whatever recomputes, and the compile probe leaves no term for the first step."""
from __future__ import annotations

import contextlib

import torch

import gptlab
from gptlab import GPTModel
from gptlab.plugin.components import pop_aux_losses
from gptlab.train.loop import compile_or_fallback, train_step

CFG = {**gptlab.PRESETS["nano"], "n_layers": 2, "emb_dim": 32, "n_heads": 4, "drop_rate": 0.0, "z_loss": 1e-2,
       "activation": {"name": "moe", "n_experts": 4, "top_k": 1, "balance": "bias", "bias_rate": 0.01}}


def train(checkpointing: bool, steps: int = 3):
    torch.manual_seed(0)
    model = GPTModel({**CFG, "gradient_checkpointing": checkpointing}).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 17), generator=g) for _ in range(steps * 2)]
    it = iter(batches)

    def batch():
        w = next(it)
        return w[:, :-1], w[:, 1:]

    aux: dict = {}
    losses = [train_step(model, opt, batch, 2, contextlib.nullcontext, 1.0, list(model.parameters()), aux=aux)
              for _ in range(steps)]
    return model, losses, aux


def test_checkpointing_trains_the_same_objective_and_moves_the_bias_once_per_step():
    plain, plain_losses, plain_aux = train(False)
    ckpt, ckpt_losses, ckpt_aux = train(True)
    assert torch.allclose(torch.stack(plain_losses), torch.stack(ckpt_losses), atol=1e-6)
    assert set(plain_aux) == {"z_loss", "router_z", "moe_max_load", "moe_dead_experts"}
    for name in plain_aux:
        assert torch.allclose(plain_aux[name], ckpt_aux[name], atol=1e-6), name
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    bias = plain.blocks[0].mlp.load_bias
    assert bias.abs().max() > 0 and bias.abs().max() <= 3 * 0.01 + 1e-9  # three steps of at most bias_rate
    assert pop_aux_losses(ckpt) == {}  # nothing left behind for the next step


def test_the_compile_probe_leaves_no_auxiliary_term_and_no_bias_move():
    torch.manual_seed(0)
    model = GPTModel(CFG).train()
    before = model.blocks[0].mlp.load_bias.clone()
    step_model, note = compile_or_fallback(model, (2, 16), torch.device("cpu"), contextlib.nullcontext)
    assert pop_aux_losses(model) == {} and torch.equal(model.blocks[0].mlp.load_bias, before)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    window = torch.randint(0, 256, (2, 17))
    loss = train_step(step_model, opt, lambda: (window[:, :-1], window[:, 1:]), 1, contextlib.nullcontext, 1.0,
                      list(model.parameters()))
    assert torch.isfinite(loss) and note.startswith("compiled"), note  # graph breaks (MoE routing) are fine
