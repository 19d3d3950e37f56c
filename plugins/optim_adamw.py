"""Optimizer 'adamw': Adam with decoupled weight decay (Loshchilov & Hutter 2019), torch's own; the default."""
from typing import Annotated, Optional

import torch

import gptlab
from gptlab import Range


def adamw(params, train, eps: Annotated[float, Range(gt=0)] = 1e-8, fused: Optional[bool] = None):
    """AdamW (torch.optim.AdamW), betas train.beta1/beta2, decay per group; fused kernels on CUDA."""
    on_cuda = bool(params) and params[0].param.device.type == "cuda"
    extra = {"fused": True} if (on_cuda if fused is None else fused) else {}
    return torch.optim.AdamW(gptlab.param_groups(params, train.lr), lr=train.lr, betas=(train.beta1, train.beta2),
                             eps=eps, **extra)


@gptlab.hookimpl
def gptlab_register(register):
    register("optimizer", "adamw", adamw)
