"""Position 'rope': rotary embeddings (Su et al. 2021) that rotate queries and keys by position."""
from typing import Annotated

import torch

import gptlab
from gptlab import PositionalContext, PositionScheme, Range
from gptlab import ConfigError


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryPositions(PositionScheme):
    """Rotary position embedding on q/k (half-split layout); relative by construction, any length."""

    provides = frozenset({"rotation"})

    def __init__(self, cfg, base: Annotated[float, Range(gt=0)] = 10000.0):
        super().__init__()
        self.head_dim, self.base = cfg.head_dim, float(base)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(cfg.context_length, inv_freq.device)

    @classmethod
    def check(cls, cfg, base=10000.0):
        if cfg.head_dim % 2:
            raise ConfigError(f"needs an even head dimension, got emb_dim/n_heads = {cfg.head_dim}")

    def _build(self, n, device):
        # normal tensors even when first grown under inference_mode, so training can reuse them
        with torch.inference_mode(False):
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()  # cached tables, grown only when needed

    def context(self, offset, q_len, device, dtype):
        end = offset + q_len
        if end > self._cos.shape[0] or self._cos.device != device:
            self._build(max(end, self._cos.shape[0]), device)
        cos, sin = self._cos[offset:end], self._sin[offset:end]

        def rotate(q, k):
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

        return PositionalContext(offset, q_len, rotate=rotate)


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "rope", RotaryPositions)
