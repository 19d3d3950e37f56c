"""Reusable building blocks for component plugins: multi-head attention with a pluggable score
step, and the feed-forward networks. They name no variant; plugins pick the math."""
from __future__ import annotations

import math
from typing import Annotated, Callable, Optional

import torch
from torch import nn

from .components import KVCache, PositionalContext, mark_residual, merge_heads, split_heads
from ..errors import ConfigError
from .hookspecs import Range

#: the type and bounds of a width or head-count option (checked by the registry)
Positive = Annotated[Optional[int], Range(ge=1)]
#: a soft cap: null (none) or a positive number
Cap = Annotated[Optional[float], Range(gt=0)]
#: the norms QK-norm can apply to each head's queries and keys
QK_NORMS = ("rmsnorm", "layernorm")


class CausalSelfAttention(nn.Module):
    """Q/K/V projection, rotation, KV cache and grouped-query heads; subclasses implement ``attend``.

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (1 = multi-query). The options every
    subclass inherits (when its ``__init__`` passes them on): ``qk_norm`` (``rmsnorm`` or
    ``layernorm`` over each head's queries and keys, after projection and before the rotation;
    ``qk_norm_scale`` false drops its learned gain), ``softcap`` (attention scores become
    ``softcap * tanh(score / softcap)``, before the position's bias and the mask) and ``window``
    (sliding-window attention: each query sees itself and the ``window - 1`` keys before it, in
    training and through the KV cache). ``transform_qkv`` is the seam for ideas of QK-norm's kind;
    ``scores`` and ``allowed`` give a subclass's ``attend`` the cap, bias, window and mask.

    ``accepts`` declares what this class applies: the base applies the position's rotation in
    ``forward``; a subclass whose ``attend`` adds ``ctx.score_bias`` declares it too
    (``accepts = frozenset({"rotation", "score_bias"})``), so one that ignores the bias is refused
    with ALiBi when the model is built instead of silently dropping it.
    """

    accepts = frozenset({"rotation"})
    #: what importers map tensors onto (role -> attribute): ``qkv`` rows [q; k; v], then ``out_proj``.
    #: A subclass that renames either declares the new name here (``gptlab.plugin.contract``)
    param_names = {"qkv": "qkv", "out_proj": "out_proj"}

    def __init__(self, cfg, n_kv_heads: Positive = None, qk_norm: Optional[str] = None, qk_norm_scale: bool = True,
                 softcap: Cap = None, window: Positive = None) -> None:
        super().__init__()
        CausalSelfAttention.check(cfg, n_kv_heads, qk_norm)  # a subclass's own check runs at lookup, with its options
        self.n_heads = cfg.n_heads
        self.n_kv_heads = n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_size
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)  # rows: [q; k; v]
        self.out_proj = mark_residual(nn.Linear(q_dim, cfg.emb_dim, bias=cfg.uses_bias("attn_out")))
        self.dropout = cfg.drop_rate
        self.softcap, self.window = softcap, window
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm, self.k_norm = (_head_norm(qk_norm, self.head_dim, qk_norm_scale) for _ in range(2))
            if qk_norm_scale:  # learned gains an importer could fill: declare them
                self.param_names = {**type(self).param_names, "q_norm": "q_norm", "k_norm": "k_norm"}

    @classmethod
    def parameter_count(cls, cfg, n_kv_heads: Optional[int] = None, qk_norm: Optional[str] = None,
                        qk_norm_scale: bool = True, **options) -> int:
        """Parameters of one such attention, for the size check before anything is built (a subclass
        with parameters of its own adds them)."""
        q = cfg.n_heads * cfg.head_size
        kv = (n_kv_heads or cfg.n_heads) * cfg.head_size
        count = cfg.emb_dim * (q + 2 * kv) + (q + 2 * kv) * cfg.qkv_bias + q * cfg.emb_dim
        count += cfg.emb_dim * cfg.uses_bias("attn_out")
        return count + (2 * cfg.head_size if qk_norm and qk_norm_scale else 0)

    @classmethod
    def check(cls, cfg, n_kv_heads: Optional[int] = None, qk_norm: Optional[str] = None) -> None:
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ConfigError(f"attention option qk_norm must be {' or '.join(QK_NORMS)} (or null: none), "
                              f"got {qk_norm!r}")
        if n_kv_heads is not None:
            if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0:
                raise ConfigError(f"attention option n_kv_heads must be a positive integer, got {n_kv_heads!r}")
            if cfg.n_heads % n_kv_heads:
                raise ConfigError(f"attention option n_kv_heads={n_kv_heads} must divide n_heads={cfg.n_heads}")

    def forward(self, x: torch.Tensor, ctx: PositionalContext, cache: Optional[KVCache] = None) -> torch.Tensor:
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q, k, v = split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        q, k, v = self.transform_qkv(q, k, v, ctx)
        if ctx.rotate is not None:
            q, k = ctx.rotate(q, k)
        if cache is not None:
            k, v = cache.update(k, v)
        y = self.attend(q, k, v, ctx)
        return self.out_proj(merge_heads(y))

    def transform_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      ctx: PositionalContext) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """The seam between projection and rotation: (B, H, T, D) queries, (B, Hkv, T, D) keys and
        values in, the same shapes out (``ctx.tokens`` holds the new tokens' ids). The base applies
        QK-norm when asked; a subclass that transforms q, k or v otherwise overrides it (calling
        ``super()`` keeps QK-norm working)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def allowed(self, ctx: PositionalContext, device: torch.device) -> torch.Tensor:
        """Boolean (Tq, Tk): True where a query may attend a key (causal, within ``window``)."""
        return ctx.causal_mask(device, self.window)

    def scores(self, q: torch.Tensor, k: torch.Tensor, ctx: PositionalContext) -> torch.Tensor:
        """Attention scores (B, H, Tq, Tk) as an explicit ``attend`` uses them: QK^T / sqrt(d),
        soft-capped when asked, plus the position's score bias, -inf where ``allowed`` says no.
        ``k`` already has one head per query head (``expand_kv``)."""
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        if ctx.score_bias is not None:  # the bias with the mask folded in, built once per forward
            return s + ctx.masked_bias(s.dtype, q.device, self.window)
        return s.masked_fill(~self.allowed(ctx, q.device), float("-inf"))

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Repeat each key/value head for its group of query heads."""
        if self.n_kv_heads == self.n_heads:
            return t
        B, H, T, D = t.shape
        rep = self.n_heads // H
        return t[:, :, None].expand(B, H, rep, T, D).reshape(B, H * rep, T, D)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PositionalContext) -> torch.Tensor:
        """(B, H, Tq, D) queries, (B, Hkv, Tk, D) keys/values -> (B, H, Tq, D)."""
        raise NotImplementedError

    def kernel_path(self, ctx: PositionalContext) -> str:
        """A short description of which kernel runs for this context (for benchmarks and logs)."""
        return "explicit"


class FlexAttention(CausalSelfAttention):
    """Attention through torch's ``flex_attention``: a variant is a subclass that writes
    ``score_mod(score, b, h, q, kv)`` (a new score for query position ``q`` and key position ``kv``,
    absolute positions, KV cache included) and/or ``mask_mod(b, h, q, kv)`` (True where the query
    may attend; the causal mask and the ``window`` option are always applied on top). ``self.ctx``
    holds the forward's PositionalContext while the mods run (``ctx.seen_tokens`` for document
    masks). The base options (``softcap``, ``window``, ``qk_norm``) work as in every attention.

    torch runs FlexAttention's backward on CUDA only (``trains_on``): on the CPU it evaluates and
    generates (unfused, to 1e-5 of the explicit attention), and a CPU training run is refused
    before it starts. It has no attention-weight dropout."""

    trains_on = frozenset({"cuda"})

    @classmethod
    def check(cls, cfg, n_kv_heads: Optional[int] = None, qk_norm: Optional[str] = None) -> None:
        super().check(cfg, n_kv_heads, qk_norm)
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise ConfigError(f"attention '{cls.__name__}' needs torch.nn.attention.flex_attention (torch 2.5 or "
                              f"later); this torch is {torch.__version__}") from None

    def score_mod(self, score: torch.Tensor, b, h, q, kv) -> torch.Tensor:
        return score

    def mask_mod(self, b, h, q, kv):
        return kv >= 0  # everything: the causal mask and the window are added by attend

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PositionalContext) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.ctx, offset, window, cap = ctx, ctx.offset, self.window, self.softcap
        own_mask = type(self).mask_mod is not FlexAttention.mask_mod

        def mask(b, h, q_idx, kv_idx):
            at = q_idx + offset
            keep = kv_idx <= at
            if window is not None:
                keep = keep & (kv_idx > at - window)
            return keep & self.mask_mod(b, h, at, kv_idx) if own_mask else keep

        def score(s, b, h, q_idx, kv_idx):
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            return self.score_mod(s, b, h, q_idx + offset, kv_idx)

        B = q.shape[0] if own_mask else None  # a mask of the batch's own tokens differs per row
        block = create_block_mask(mask, B, None, q.shape[-2], k.shape[-2], device=q.device)
        grouped = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        run = _compiled_flex() if q.is_cuda else flex_attention  # eager is the unfused reference
        try:
            return run(q, k, v, score_mod=score, block_mask=block, **grouped)
        finally:
            self.ctx = None

    def kernel_path(self, ctx: PositionalContext) -> str:
        return "flex_attention (fused when compiled on CUDA)"


_COMPILED_FLEX: list = []


def _compiled_flex() -> Callable:
    """torch.compile(flex_attention), built once: on CUDA that is what makes it a fused kernel."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


def _head_norm(kind: str, dim: int, scale: bool) -> nn.Module:
    """QK-norm's norm over one head's width; ``scale`` false: no learned gain."""
    norm = nn.RMSNorm(dim, elementwise_affine=scale) if kind == "rmsnorm" else \
        nn.LayerNorm(dim, elementwise_affine=scale, bias=False)
    norm._gptlab_norm = True  # its gain is a norm's (optimizer groups)
    return norm


def _activation_factory(cls, act: Callable[[torch.Tensor], torch.Tensor], doc: str) -> Callable[..., nn.Module]:
    """A factory to register as an activation: ``cls(cfg, act, hidden_dim)``, shown with ``doc``."""
    def factory(cfg, hidden_dim: Positive = None) -> nn.Module:
        return cls(cfg, act, hidden_dim)

    factory.__doc__ = doc
    factory.gated = cls.gated  # what a size count before the build needs to know (two input projections)
    return factory


class MLP(nn.Module):
    """Linear -> activation -> linear, hidden width ``ff_dim`` (default 4 x emb_dim).

    ``MLP.factory(F.relu, "doc")`` is a ready activation factory, option ``hidden_dim``.
    """

    gated = False
    factory = classmethod(_activation_factory)
    #: what importers map tensors onto (role -> attribute): the input projection, then the output one
    param_names = {"fc": "fc", "proj": "proj"}

    def __init__(self, cfg, act: Callable[[torch.Tensor], torch.Tensor], hidden_dim: Optional[int] = None) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim or cfg.ff_dim or 4 * cfg.emb_dim
        self.fc = nn.Linear(cfg.emb_dim, self.hidden_dim, bias=cfg.uses_bias("mlp"))
        self.proj = mark_residual(nn.Linear(self.hidden_dim, cfg.emb_dim, bias=cfg.uses_bias("mlp")))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GatedMLP(nn.Module):
    """act(x W_gate) * (x W_up), then W_down. Default hidden width is 2/3 of 4 x emb_dim, which
    keeps the weight count of the ungated 4x MLP (3*d*h = 8*d*d); ``ff_dim`` sets it explicitly.
    ``GatedMLP.factory(F.silu, "doc")`` is a ready activation factory."""

    gated = True
    factory = classmethod(_activation_factory)
    #: role -> attribute, as MLP's; ``fc`` holds the gate's rows, then the up projection's
    param_names = {"fc": "fc", "proj": "proj"}

    def __init__(self, cfg, act: Callable[[torch.Tensor], torch.Tensor], hidden_dim: Optional[int] = None) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim or cfg.ff_dim or gated_hidden_dim(cfg.emb_dim)
        self.fc = nn.Linear(cfg.emb_dim, 2 * self.hidden_dim, bias=cfg.uses_bias("mlp"))  # rows: [gate; up]
        self.proj = mark_residual(nn.Linear(self.hidden_dim, cfg.emb_dim, bias=cfg.uses_bias("mlp")))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(self.act(gate) * up)


def gated_hidden_dim(emb_dim: int) -> int:
    """Parameter-matched width of a gated MLP: round(2/3 * 4 * emb_dim)."""
    return int(round(8 * emb_dim / 3))
