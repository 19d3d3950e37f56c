"""Position 'sinusoidal': the fixed sine/cosine table of Vaswani et al. (2017), added to embeddings."""
import math
from typing import Annotated

import torch

import gptlab
from gptlab import PositionScheme, Range


def sinusoid_table(n_positions, dim, base=10000.0):
    """PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim))."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table.float()


class SinusoidalPositions(PositionScheme):
    """Fixed sinusoidal absolute positions, scaled to the token embeddings' size; any length.

    The raw table has entries of size ~0.7, while GPT-2 initialises token embeddings with std 0.02,
    so unscaled it drowns the tokens and training stalls at the unigram loss. Vaswani et al. scale
    the embeddings up by sqrt(emb_dim) instead; here ``scale`` (default 0.02 * sqrt(2), giving the
    table an RMS of 0.02) scales the table down, leaving the skeleton's embeddings untouched.
    """

    provides = frozenset({"embedding"})

    def __init__(self, cfg, base: Annotated[float, Range(gt=0)] = 10000.0,
                 scale: Annotated[float, Range(gt=0)] = 0.02 * math.sqrt(2)):
        super().__init__()
        self.dim, self.base, self.scale = cfg.emb_dim, float(base), float(scale)
        self.register_buffer("table", self._table(cfg.context_length), persistent=False)

    def _table(self, n):
        return sinusoid_table(n, self.dim, self.base) * self.scale

    def embed(self, x, offset):
        end = offset + x.shape[1]
        if end > self.table.shape[0]:  # grow once, then reuse (as a normal tensor, even under inference_mode)
            with torch.inference_mode(False):
                self.table = self._table(max(end, 2 * self.table.shape[0])).to(self.table.device)
        return x + self.table[offset:end].to(x.dtype)


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "sinusoidal", SinusoidalPositions)
