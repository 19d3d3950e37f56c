"""The contracts between the skeleton and its components.

A positional scheme acts through up to three seams, and says which with ``provides``:
  "embedding"  - ``embed(x, offset)`` adds a vector per position to the token embeddings;
  "rotation"   - ``context()`` returns a ``rotate(q, k)`` that attention applies to queries/keys;
  "score_bias" - ``context()`` returns an additive (heads, q_len, k_len) bias on attention scores.
An attention says which of "rotation" and "score_bias" it honours with ``accepts``; the builder
refuses a pair where the position provides something the attention would ignore.
``CausalSelfAttention`` applies the rotation itself and so accepts only "rotation"; a subclass
whose ``attend`` adds the score bias must add "score_bias" to its ``accepts``.
Positions are offsets (``offset`` = tokens already in the KV cache), never assumed to start at 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

Rotate = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class PositionalContext:
    """What one forward pass tells every attention layer about positions."""

    offset: int  # position of the first new token
    q_len: int  # number of new tokens
    rotate: Optional[Rotate] = None  # (q, k) -> (q, k), both (B, H, q_len, D)
    score_bias: Optional[torch.Tensor] = None  # (H, q_len, offset + q_len), float
    #: the new tokens' ids (B, q_len), set by the model for components that look tokens up (value embeddings)
    tokens: Optional[torch.Tensor] = None
    #: every token's id so far (B, offset + q_len), the cached ones included (document masks)
    seen_tokens: Optional[torch.Tensor] = None
    _masked: dict = field(default_factory=dict, repr=False, compare=False)  # masked_bias, per dtype

    @property
    def k_len(self) -> int:
        return self.offset + self.q_len

    def masked_bias(self, dtype: torch.dtype, device: torch.device, window: Optional[int] = None) -> torch.Tensor:
        """``score_bias`` with -inf where the causal mask (of ``window``) forbids attention, in ``dtype``:
        an additive mask built once per forward pass and shared by every layer (not cast per layer)."""
        key = (dtype, window)
        if key not in self._masked:
            bias = self.score_bias.to(device=device, dtype=dtype)
            self._masked[key] = bias.masked_fill(~self.causal_mask(device, window), float("-inf"))
        return self._masked[key]

    def causal_mask(self, device: torch.device, window: Optional[int] = None) -> torch.Tensor:
        """Boolean (q_len, k_len) mask, True where query i may attend key j: j <= offset + i, and with a
        sliding ``window``, also j > offset + i - window (each query sees itself and window - 1 before it)."""
        q = torch.arange(self.offset, self.offset + self.q_len, device=device)[:, None]
        k = torch.arange(self.k_len, device=device)[None, :]
        return (k <= q) if window is None else (k <= q) & (k > q - window)


class KVCache:
    """Keys and values of one attention layer, preallocated up to ``max_len`` positions."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """Append (B, H, T, D) keys/values; return all cached ones so far."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.max_len, D)
            self.v = v.new_empty(B, H, self.max_len, v.shape[-1])
        end = self.length + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class ModelCache:
    """One KVCache per layer plus the shared position offset."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.layers = [KVCache(max_len) for _ in range(n_layers)]
        self.max_len = max_len
        self.tokens: Optional[torch.Tensor] = None  # every token id the cache has seen, (B, offset)

    def see(self, idx: torch.Tensor) -> torch.Tensor:
        """Record the new tokens ``idx`` (B, T); returns every token so far."""
        self.tokens = idx if self.tokens is None else torch.cat([self.tokens, idx], dim=1)
        return self.tokens

    @property
    def offset(self) -> int:
        return self.layers[0].length if self.layers else 0


#: where a module keeps the auxiliary losses it added during the current forward pass
_AUX = "_gptlab_aux"


def aux_loss(module: nn.Module, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
    """Add an auxiliary loss from inside ``module``'s forward: ``weight * value`` joins the training
    loss of this step, and ``value`` is logged as ``aux/<name>`` (summed over the modules that add
    the same name, e.g. one router per layer). Only in training mode: evaluation and ``val_loss``
    never see it. ``value`` is a scalar tensor in the autograd graph."""
    if module.training:
        store = module.__dict__.setdefault(_AUX, {})
        old = store.get(name)
        store[name] = (value if old is None else old[0] + value, weight)


def aux_metric(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Log a diagnostic from inside ``module``'s forward (router health, say) as ``aux/<name>``,
    averaged over the modules that report the same name; it never joins the loss. Training mode only."""
    if module.training:
        module.__dict__.setdefault(_AUX, {})[name] = (value.detach(), None)


def pop_aux_losses(model: nn.Module) -> dict:
    """name -> (value, weight) of every auxiliary term the last forward added, cleared from the
    modules (gptlab's training step calls this after each forward): losses summed per name over
    modules; diagnostics (``aux_metric``, weight None) averaged over them."""
    out: dict = {}
    if not isinstance(model, nn.Module):  # a plain function (a benchmark's reference step) adds none
        return out
    reports: dict = {}
    for module in model.modules():
        store = module.__dict__.get(_AUX)
        if store:
            for name, (value, weight) in store.items():
                if name in out and out[name][1] != weight:
                    raise ValueError(f"auxiliary loss '{name}' was added with weights {out[name][1]} and {weight}; "
                                     f"one name, one weight")
                out[name] = (value if name not in out else out[name][0] + value, weight)
                reports[name] = reports.get(name, 0) + 1
            store.clear()
    return {name: (value / reports[name], None) if weight is None else (value, weight)
            for name, (value, weight) in out.items()}


def after_step(model: nn.Module) -> None:
    """Call ``gptlab_after_step()`` on every module of ``model`` that has one: state a component
    updates once per optimizer step, outside the forward pass (MoE's balancing bias), so that
    gradient checkpointing's recomputed forward sees exactly what the first forward saw."""
    if isinstance(model, nn.Module):
        for module in model.modules():
            hook = getattr(module, "gptlab_after_step", None)
            if callable(hook):
                hook()


def mark_residual(module: nn.Module) -> nn.Module:
    """Flag a projection that writes into the residual stream (scaled down at init, GPT-2 style)."""
    module._gptlab_residual = True  # type: ignore[attr-defined]
    return module


class Wiring(nn.Module):
    """Base for how the blocks connect (kind ``wiring``): ``forward(x, x0, run, n_layers)`` runs the
    blocks through ``run(i, h)`` (block ``i`` on hidden state ``h``, with its position context, KV
    cache and checkpointing) and returns the last hidden state; ``x0`` is the embeddings' output.
    This base runs them one after another, as every GPT does; a subclass adds what a block cannot
    express: connections across layers (skips from early to late layers, x0 mixed into each input)."""

    def __init__(self, cfg: object = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, x0: torch.Tensor, run: Callable[[int, torch.Tensor], torch.Tensor],
                n_layers: int) -> torch.Tensor:
        for i in range(n_layers):
            x = run(i, x)
        return x


class PositionScheme(nn.Module):
    """Base for positional schemes; the default acts through no seam at all."""

    provides: frozenset = frozenset()
    #: role -> attribute of each submodule with parameters an importer may fill (none here)
    param_names: dict = {}
    #: longest sequence the scheme can encode, or None when it has no limit
    max_length: Optional[int] = None

    def embed(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        return x

    def context(self, offset: int, q_len: int, device: torch.device, dtype: torch.dtype) -> PositionalContext:
        return PositionalContext(offset, q_len)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)
