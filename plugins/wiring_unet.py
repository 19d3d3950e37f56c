"""Wiring 'unet': the output of layer i is added, times a learned weight, to the input of layer
L-1-i for the first half of the layers, as modded-nanogpt's U-net skips (2024). The weights start
at ``init``; with 0 the model starts as the sequential one."""
from typing import Annotated

import torch

import gptlab
from gptlab import Range


class UNet(gptlab.Wiring):
    """U-net skips: layer i's output, weighted, joins the input of layer L-1-i."""

    def __init__(self, cfg, init: Annotated[float, Range(ge=0)] = 1.0):
        super().__init__()
        self.skip_weights = torch.nn.Parameter(torch.full((cfg.n_layers // 2,), float(init)))

    @staticmethod
    def parameter_count(cfg, **options):
        return cfg.n_layers // 2

    def forward(self, x, x0, run, n_layers):
        half, saved = n_layers // 2, []
        for i in range(n_layers):
            if i >= n_layers - half:  # the second half takes the first half's outputs, last saved first
                x = x + self.skip_weights[n_layers - 1 - i] * saved[n_layers - 1 - i]
            x = run(i, x)
            if i < half:
                saved.append(x)
        return x


@gptlab.hookimpl
def gptlab_register(register):
    register("wiring", "unet", UNet)
