"""Position 'alibi': a per-head linear penalty on attention scores by distance (Press et al. 2022)."""
import math

import torch

import gptlab
from gptlab import PositionalContext, PositionScheme


def alibi_slopes(n_heads):
    """Geometric slopes 2^(-8/n), 2^(-16/n), ...; for n not a power of two, interleave from 2n."""
    def powers(n):
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(powers(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(powers(closest) + extra)


class ALiBiPositions(PositionScheme):
    """ALiBi: no position embeddings; score bias -slope_h * (query_pos - key_pos). Any length."""

    provides = frozenset({"score_bias"})

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self._cached = (None, None)

    def bias(self, offset, q_len, device):
        q = torch.arange(offset, offset + q_len, device=device)[:, None]
        k = torch.arange(offset + q_len, device=device)[None, :]
        return -self.slopes.to(device)[:, None, None] * (q - k).clamp(min=0).float()

    def context(self, offset, q_len, device, dtype):
        if torch.compiler.is_compiling():  # a Python-side cache would make dynamo recompile per offset
            return PositionalContext(offset, q_len, score_bias=self.bias(offset, q_len, device))
        key = (offset, q_len, device)
        if self._cached[0] != key:  # eager training reuses one shape: build once
            with torch.inference_mode(False):  # a normal tensor, reusable by training
                self._cached = (key, self.bias(offset, q_len, device))
        return PositionalContext(offset, q_len, score_bias=self._cached[1])


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "alibi", ALiBiPositions)
