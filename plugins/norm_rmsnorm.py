"""Norm 'rmsnorm': x / sqrt(mean(x^2) + eps) * weight, no centring, no bias (Zhang & Sennrich 2019)."""
from typing import Annotated

from torch import nn

import gptlab
from gptlab import Range


def rmsnorm(cfg, dim, eps: Annotated[float, Range(gt=0)] = 1e-5):
    """RMSNorm: rescale by the root mean square; no mean subtraction and no bias."""
    return nn.RMSNorm(dim, eps=eps)


@gptlab.hookimpl
def gptlab_register(register):
    register("norm", "rmsnorm", rmsnorm)
