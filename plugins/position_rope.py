"""Position 'rope': rotary embeddings (Su et al. 2021) that rotate queries and keys by position.

Options beyond ``base``: ``fraction`` rotates only the first part of each head (GPT-NeoX's
``rotary_pct``; the rest passes through), and ``scaling`` stretches the frequencies for contexts
longer than training saw: ``linear`` (positions divided by ``factor``), ``ntk`` (the base raised
so the lowest frequency stretches by ``factor``) or ``llama3`` (long wavelengths divided by
``factor``, short ones kept, a smooth blend between, set by ``low_freq_factor``,
``high_freq_factor`` and ``original_context_length``).
"""
import math
from typing import Annotated, Optional

import torch

import gptlab
from gptlab import ConfigError, PositionalContext, PositionScheme, Range

SCALINGS = ("linear", "ntk", "llama3")


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def frequencies(rot_dim, base, scaling=None, factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_context_length=None):
    """The rotation frequency of each pair of rotated dimensions (float32), after any scaling."""
    if scaling == "ntk":
        base = base * factor ** (rot_dim / (rot_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        long_limit = original_context_length / low_freq_factor  # longer wavelengths: fully scaled
        short_limit = original_context_length / high_freq_factor  # shorter ones: kept as they are
        blend = (original_context_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        mixed = (1 - blend) * inv_freq / factor + blend * inv_freq
        out = torch.where(wavelength > long_limit, inv_freq / factor, inv_freq)
        between = (wavelength <= long_limit) & (wavelength >= short_limit)
        return torch.where(between, mixed, out)
    return inv_freq


class RotaryPositions(PositionScheme):
    """Rotary position embedding on q/k (half-split layout); relative by construction, any length."""

    provides = frozenset({"rotation"})

    def __init__(self, cfg, base: Annotated[float, Range(gt=0)] = 10000.0,
                 fraction: Annotated[float, Range(gt=0, le=1)] = 1.0, scaling: Optional[str] = None,
                 factor: Annotated[float, Range(gt=0)] = 1.0, low_freq_factor: Annotated[float, Range(gt=0)] = 1.0,
                 high_freq_factor: Annotated[float, Range(gt=0)] = 4.0,
                 original_context_length: Annotated[Optional[int], Range(ge=1)] = None):
        super().__init__()
        self.head_dim, self.base = cfg.head_size, float(base)
        self.rot_dim = rotated_dims(cfg.head_size, fraction)
        inv_freq = frequencies(self.rot_dim, self.base, scaling, factor, low_freq_factor, high_freq_factor,
                               original_context_length)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # buffers, so .to(device) moves the tables with the model (no rebuild, no recompile)
        self.register_buffer("_cos", None, persistent=False)
        self.register_buffer("_sin", None, persistent=False)
        self._build(cfg.context_length, inv_freq.device)

    @classmethod
    def check(cls, cfg, base=10000.0, fraction=1.0, scaling=None, factor=1.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_context_length=None):
        rot = rotated_dims(cfg.head_size, fraction)
        if rot % 2 or rot == 0:
            raise ConfigError(f"rope rotates {rot} of each head's {cfg.head_size} dimensions (fraction {fraction}); "
                              f"that must be a positive even number")
        if scaling is not None and scaling not in SCALINGS:
            raise ConfigError(f"rope option scaling must be one of {', '.join(SCALINGS)} or null, got {scaling!r}")
        if scaling is None and factor != 1.0:
            raise ConfigError(f"rope option factor={factor} has no effect without scaling; set scaling: "
                              f"{' | '.join(SCALINGS)}")
        if scaling == "ntk" and rot <= 2:
            raise ConfigError("rope scaling 'ntk' needs more than 2 rotated dimensions per head")
        if scaling == "llama3":
            if original_context_length is None:
                raise ConfigError("rope scaling 'llama3' needs original_context_length (the length it was trained at)")
            if high_freq_factor <= low_freq_factor:
                raise ConfigError(f"rope option high_freq_factor ({high_freq_factor}) must be greater than "
                                  f"low_freq_factor ({low_freq_factor})")

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
        rot = self.rot_dim

        def rotate(q, k):
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            if rot == q.shape[-1]:
                return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
            (qr, qp), (kr, kp) = q.split([rot, q.shape[-1] - rot], -1), k.split([rot, k.shape[-1] - rot], -1)
            return (torch.cat((qr * c + rotate_half(qr) * s, qp), -1),
                    torch.cat((kr * c + rotate_half(kr) * s, kp), -1))

        return PositionalContext(offset, q_len, rotate=rotate)


def rotated_dims(head_dim, fraction):
    """How many of a head's dimensions rotate (GPT-NeoX rounds down the same way)."""
    return int(head_dim * fraction)


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "rope", RotaryPositions)
