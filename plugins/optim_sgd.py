"""Optimizer 'sgd': stochastic gradient descent with optional (Nesterov) momentum, torch's own."""
from typing import Annotated

import torch

import gptlab
from gptlab import ConfigError, Range


def sgd(params, train, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9, nesterov: bool = False):
    """SGD (torch.optim.SGD) with momentum; weight decay per group, added to the gradient (L2)."""
    return torch.optim.SGD(gptlab.param_groups(params, train.lr), lr=train.lr, momentum=momentum, nesterov=nesterov)


def _check(momentum: float = 0.9, nesterov: bool = False):
    if nesterov and momentum == 0:
        raise ConfigError("nesterov: true needs momentum > 0")


sgd.check = _check


@gptlab.hookimpl
def gptlab_register(register):
    register("optimizer", "sgd", sgd)
