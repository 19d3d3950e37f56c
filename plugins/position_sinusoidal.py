"""Position 'sinusoidal': the fixed sine/cosine table of Vaswani et al. (2017), added to embeddings."""
import math

import torch

import gptlab
from gptlab.components import PositionScheme


def sinusoid_table(n_positions, dim, base=10000.0):
    """PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim))."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table.float()


class SinusoidalPositions(PositionScheme):
    """Fixed sinusoidal absolute positions; no parameters, defined for any length."""

    provides = frozenset({"embedding"})

    def __init__(self, cfg, base=10000.0):
        super().__init__()
        self.dim, self.base = cfg.emb_dim, float(base)
        self.register_buffer("table", sinusoid_table(cfg.context_length, cfg.emb_dim, self.base), persistent=False)

    def embed(self, x, offset):
        end = offset + x.shape[1]
        if end > self.table.shape[0]:  # grow once, then reuse (as a normal tensor, even under inference_mode)
            with torch.inference_mode(False):
                self.table = sinusoid_table(max(end, 2 * self.table.shape[0]), self.dim, self.base).to(self.table.device)
        return x + self.table[offset:end].to(x.dtype)


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "sinusoidal", SinusoidalPositions)
