"""Optimizer 'muon': momentum orthogonalised by a Newton-Schulz iteration for the hidden matrices,
AdamW for embeddings, head, norms and biases (Jordan et al. 2024, "Muon: an optimizer for hidden
layers"; the quintic iteration and the momentum warmup of modded-nanogpt).

``train.lr`` is the Muon rate of the hidden matrices; ``adamw_lr`` the AdamW rate of the rest
(null: train.lr). Under DDP the gradients are averaged before ``step``, so every rank
orthogonalises the same matrix. A tensor of more than two dimensions (stacked experts) is
orthogonalised matrix by matrix over its last two.
"""
import math
from typing import Annotated, Optional

import torch

import gptlab
from gptlab import ConfigError, Range

#: the quintic's coefficients: they push every singular value of the normalised matrix toward 1
#: in few steps (to about 0.7-1.2, which training tolerates), rather than converging exactly
QUINTIC = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T for g = U S V^T, over g's last two dimensions: ``steps`` quintic Newton-Schulz
    iterations in bfloat16 on CUDA (as modded-nanogpt), float32 elsewhere."""
    a, b, c = QUINTIC
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: X X^T is the smaller square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with ``use_muon`` take the Muon update, the others AdamW's; one optimizer, one state."""

    def __init__(self, groups, lr: float, momentum: float, nesterov: bool, ns_steps: int, momentum_warmup: int,
                 momentum_start: float, betas: tuple, eps: float, adjust_lr: str) -> None:
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, "use_muon": False, "momentum": momentum,
                                  "nesterov": nesterov, "ns_steps": ns_steps, "momentum_warmup": momentum_warmup,
                                  "momentum_start": momentum_start, "betas": betas, "eps": eps,
                                  "adjust_lr": adjust_lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # the step count stays a CPU tensor: reading it never waits on a GPU
                    state["step"] = torch.zeros((), dtype=torch.float32)
                state["step"] += 1
                (self._muon if group["use_muon"] else self._adamw)(p, group, state, int(state["step"].item()))
        return loss

    @staticmethod
    def _muon(p: torch.Tensor, group: dict, state: dict, step: int) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        warm = min(1.0, step / group["momentum_warmup"]) if group["momentum_warmup"] else 1.0
        momentum = (1 - warm) * group["momentum_start"] + warm * group["momentum"]
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        update = orthogonalize(p.grad.lerp(buf, momentum) if group["nesterov"] else buf, group["ns_steps"])
        rows, cols = p.size(-2), p.size(-1)
        scale = max(1.0, rows / cols) ** 0.5 if group["adjust_lr"] == "original" else 0.2 * max(rows, cols) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * scale)

    @staticmethod
    def _adamw(p: torch.Tensor, group: dict, state: dict, step: int) -> None:
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(p.grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))


def muon(params, train, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.95, nesterov: bool = True,
         ns_steps: Annotated[int, Range(ge=1, le=100)] = 5, momentum_warmup: Annotated[int, Range(ge=0)] = 300,
         momentum_start: Annotated[float, Range(ge=0, lt=1)] = 0.85,
         adamw_lr: Annotated[Optional[float], Range(gt=0)] = None, eps: Annotated[float, Range(gt=0)] = 1e-8,
         adjust_lr: str = "original"):
    """Muon: Newton-Schulz-orthogonalised momentum for hidden matrices, AdamW for the rest."""
    hidden = [p for p in params if p.hidden_matrix]
    rest = [p for p in params if not p.hidden_matrix]
    adam_lr = train.lr if adamw_lr is None else adamw_lr
    groups = [{**g, "name": f"{g['name']}.muon"} for g in gptlab.param_groups(hidden, train.lr, use_muon=True)]
    groups += [{**g, "name": f"{g['name']}.adamw"} for g in gptlab.param_groups(rest, adam_lr, use_muon=False)]
    return Muon(groups, lr=train.lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                momentum_warmup=momentum_warmup, momentum_start=momentum_start, betas=(train.beta1, train.beta2),
                eps=eps, adjust_lr=adjust_lr)


def _check(adjust_lr: str = "original", **_):
    if adjust_lr not in ("original", "match_rms_adamw"):
        raise ConfigError(f"option adjust_lr must be original (scale by sqrt(max(1, rows/cols))) or match_rms_adamw "
                          f"(0.2 sqrt(max(rows, cols)): AdamW's update size), got {adjust_lr!r}")


muon.check = _check


@gptlab.hookimpl
def gptlab_register(register):
    register("optimizer", "muon", muon)
