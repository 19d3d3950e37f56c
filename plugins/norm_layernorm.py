"""Norm 'layernorm': (x - mean) / sqrt(var + eps) * weight + bias (Ba et al. 2016)."""
from typing import Annotated

from torch import nn

import gptlab
from gptlab import Range


def layernorm(cfg, dim, eps: Annotated[float, Range(gt=0)] = 1e-5):
    """LayerNorm with a bias unless model.norm_bias (default: model.bias) is false."""
    return nn.LayerNorm(dim, eps=eps, bias=cfg.uses_bias("norm"))


layernorm.parameter_count = lambda cfg, dim: dim * (2 if cfg.uses_bias("norm") else 1)  # gain, and bias


@gptlab.hookimpl
def gptlab_register(register):
    register("norm", "layernorm", layernorm)
