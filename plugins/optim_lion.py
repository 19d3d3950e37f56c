"""Optimizer 'lion': the sign of an interpolated momentum (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms"). Its updates are +-lr per element, so it wants a learning rate 3-10x
below AdamW's and a weight decay as many times larger."""
from typing import Annotated

import torch

import gptlab
from gptlab import ConfigError, Range


class Lion(torch.optim.Optimizer):
    """update = sign(beta1 m + (1 - beta1) g); p <- p (1 - lr wd) - lr update; m <- beta2 m + (1 - beta2) g."""

    def __init__(self, groups, lr: float, betas: tuple) -> None:
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.lerp(p.grad, 1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)
        return loss


def lion(params, train, betas: list = (0.9, 0.99)):
    """Lion: sign of an interpolated momentum; a few times lower lr than AdamW, more decay."""
    return Lion(gptlab.param_groups(params, train.lr), lr=train.lr, betas=tuple(betas))


def _check(betas: list = (0.9, 0.99)):
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"option betas must be two numbers in [0, 1), got {list(betas)!r}")


lion.check = _check


@gptlab.hookimpl
def gptlab_register(register):
    register("optimizer", "lion", lion)
