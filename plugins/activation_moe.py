"""Activation 'moe': a Mixture-of-Experts feed-forward layer (Shazeer et al. 2017; Switch, Fedus et
al. 2021; GShard; Mixtral; DeepSeek-V3's auxiliary-loss-free balancing).

Each token goes to its ``top_k`` of ``n_experts`` expert MLPs, chosen by a linear router with a
softmax or sigmoid gate, and gets their outputs weighted by the gate (renormalised over the chosen
experts when k > 1 or the gate is a sigmoid). Routing is dropless: every expert takes every token
sent to it, however many. Balance: ``aux`` adds the Switch/GShard loss E * sum_e f_e P_e (f: share
of assignments, P: mean gate) as the auxiliary loss ``moe_balance``; ``bias`` keeps a per-expert
bias that only steers the choice, nudged after each optimizer step (counts summed over DDP ranks)
toward the less loaded experts (DeepSeek-V3); ``none`` neither. ``router_z_loss`` adds mean(logsumexp(router logits)^2)
(ST-MoE) as ``router_z``. The default expert width, 4 x emb_dim / top_k (/ (top_k + 1) with the
shared expert), gives a token the FLOPs of the dense 4x MLP, so a comparison at equal active
compute is the default; ``inactive_parameters`` tells gptlab's FLOP count and MFU which weights a
token does not use.
"""
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from torch import nn

import gptlab
from gptlab import ConfigError, Range

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "relu2": lambda x: F.relu(x).square()}
GATES, BALANCE = ("softmax", "sigmoid"), ("aux", "bias", "none")


def expert_width(cfg, top_k: int, shared_expert: bool, expert_dim: Optional[int]) -> int:
    return expert_dim or max(1, round(4 * cfg.emb_dim / (top_k + shared_expert)))


class MoE(nn.Module):
    """Top-k routed experts (dropless), optional shared expert, aux-loss or bias balancing."""

    gated = False

    def __init__(self, cfg, n_experts=8, top_k=2, expert_dim=None, gate="softmax", shared_expert=False,
                 balance="aux", balance_weight=0.01, bias_rate=1e-3, router_z_loss=1e-3, activation="gelu"):
        super().__init__()
        d, self.k, self.n_experts = cfg.emb_dim, top_k, n_experts
        self.expert_dim = h = expert_width(cfg, top_k, shared_expert, expert_dim)
        self.gate, self.balance, self.act = gate, balance, ACTIVATIONS[activation]
        self.balance_weight, self.bias_rate, self.router_z_loss = balance_weight, bias_rate, router_z_loss
        self.router = nn.Linear(d, n_experts, bias=False)
        # one (out, in) matrix per expert, as nn.Linear lays its weight out (Muon's step scale reads it so)
        self.w_in = nn.Parameter(torch.randn(n_experts, h, d) * 0.02)
        self.w_out = nn.Parameter(torch.randn(n_experts, d, h) * (0.02 / (2 * cfg.n_layers) ** 0.5))
        self._load = None  # the last training forward's assignments per expert (balance: bias)
        self.register_buffer("load_bias", torch.zeros(n_experts))  # steers the choice only (balance: bias)
        self.shared = gptlab.MLP(cfg, self.act, h) if shared_expert else None
        self.hidden_dim = h * (top_k + shared_expert)  # activations one token keeps (memory estimate)

    def inactive_parameters(self) -> int:
        """Expert weights one token does not use: those of the n_experts - top_k experts it skips."""
        return (self.n_experts - self.k) * (self.w_in[0].numel() + self.w_out[0].numel())

    def route(self, flat: torch.Tensor):
        """(logits, gate probabilities, chosen experts (N, k), their weights (N, k))."""
        logits = self.router(flat).float()
        probs = torch.softmax(logits, -1) if self.gate == "softmax" else torch.sigmoid(logits)
        choice = probs + self.load_bias if self.balance == "bias" else probs
        idx = choice.topk(self.k, dim=-1).indices
        weights = probs.gather(-1, idx)
        if self.k > 1 or self.gate == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, idx, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        logits, probs, idx, weights = self.route(flat)
        slots = idx.reshape(-1)  # token n's j-th choice is slot n * k + j
        order = slots.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(slots, minlength=self.n_experts)
        inputs = flat[order // self.k].split(counts.tolist())
        outs = [self.act(chunk @ self.w_in[e].mT) @ self.w_out[e].mT for e, chunk in enumerate(inputs)]
        y = torch.cat(outs) * weights.reshape(-1)[order, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, order // self.k, y)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            self._balance(logits, probs, counts)
        return out.view(B, T, C)

    def _balance(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        if self.balance == "aux" and self.balance_weight > 0:
            share = counts.float() / counts.sum()
            mean_gate = (probs / probs.sum(-1, keepdim=True)).mean(0)
            gptlab.aux_loss(self, "moe_balance", self.n_experts * (share * mean_gate).sum(), self.balance_weight)
        if self.balance == "bias":  # applied after the optimizer step: a recomputed forward routes the same
            self._load = counts.detach()
        if self.router_z_loss > 0:
            gptlab.aux_loss(self, "router_z", torch.logsumexp(logits, -1).pow(2).mean(), self.router_z_loss)
        load = counts.float()  # router health, averaged over layers: 1.0 is perfectly even, 0 dead is best
        gptlab.aux_metric(self, "moe_max_load", load.max() / load.mean())
        gptlab.aux_metric(self, "moe_dead_experts", (load == 0).float().mean())


    def gptlab_after_step(self) -> None:
        """The auxiliary-loss-free update, once per optimizer step from the last micro-batch's load
        (summed over ranks, so every rank keeps the same bias): each expert's bias moves by bias_rate
        toward the less loaded side."""
        if self._load is None:
            return
        load, self._load = self._load.float(), None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        with torch.no_grad():
            self.load_bias += self.bias_rate * torch.sign(load.mean() - load)


def moe(cfg, n_experts: Annotated[int, Range(ge=1)] = 8, top_k: Annotated[int, Range(ge=1)] = 2,
        expert_dim: Annotated[Optional[int], Range(ge=1)] = None, gate: str = "softmax", shared_expert: bool = False,
        balance: str = "aux", balance_weight: Annotated[float, Range(ge=0)] = 0.01,
        bias_rate: Annotated[float, Range(gt=0)] = 1e-3, router_z_loss: Annotated[float, Range(ge=0)] = 1e-3,
        activation: str = "gelu"):
    """Mixture-of-Experts MLP: top-k routed experts (dropless), aux-loss or bias balancing."""
    return MoE(cfg, n_experts, top_k, expert_dim, gate, shared_expert, balance, balance_weight, bias_rate,
               router_z_loss, activation)


def _check(cfg, n_experts=8, top_k=2, gate="softmax", balance="aux", activation="gelu", **_):
    for name, value, allowed in (("gate", gate, GATES), ("balance", balance, BALANCE),
                                 ("activation", activation, tuple(ACTIVATIONS))):
        if value not in allowed:
            raise ConfigError(f"option {name} must be one of {', '.join(allowed)}, got {value!r}")
    if top_k > n_experts:
        raise ConfigError(f"option top_k={top_k} is more than n_experts={n_experts}")


def _parameter_count(cfg, n_experts=8, top_k=2, expert_dim=None, shared_expert=False, **_):
    """Parameters of one layer, for the size check before anything is built."""
    d, h = cfg.emb_dim, expert_width(cfg, top_k, shared_expert, expert_dim)
    shared = (2 * d * h + (h + d) * cfg.uses_bias("mlp")) if shared_expert else 0
    return d * n_experts + 2 * n_experts * d * h + shared


moe.check = _check
moe.parameter_count = _parameter_count


@gptlab.hookimpl
def gptlab_register(register):
    register("activation", "moe", moe)
