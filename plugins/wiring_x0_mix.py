"""Wiring 'x0_mix': each layer's input is a_i h + b_i x0, the running hidden state mixed with the
embeddings' output x0 by learned per-layer scalars (modded-nanogpt, 2024). They start at a = 1,
b = ``init`` (0: the sequential model)."""
from typing import Annotated

import torch

import gptlab
from gptlab import Range


class X0Mix(gptlab.Wiring):
    """Each layer's input mixes the hidden state with the embeddings x0 (learned scalars per layer)."""

    def __init__(self, cfg, init: Annotated[float, Range(ge=0)] = 0.0):
        super().__init__()
        # two vectors, not an (L, 2) matrix: scalars to an optimizer, never a hidden matrix
        self.a = torch.nn.Parameter(torch.ones(cfg.n_layers))
        self.b = torch.nn.Parameter(torch.full((cfg.n_layers,), float(init)))

    @staticmethod
    def parameter_count(cfg, **options):
        return 2 * cfg.n_layers

    def forward(self, x, x0, run, n_layers):
        for i in range(n_layers):
            x = run(i, self.a[i] * x + self.b[i] * x0)
        return x


@gptlab.hookimpl
def gptlab_register(register):
    register("wiring", "x0_mix", X0Mix)
