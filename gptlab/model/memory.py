"""Training-memory estimate: weights, gradients, AdamW state and activations for one batch.

Activations follow the accounting of Korthikanti et al. (2022, "Reducing Activation Recomputation
in Large Transformer Models"), adapted to this model's widths: per layer we count the tensors
autograd keeps for the backward pass. It is an estimate (allocator overhead and temporary
buffers are not modelled); ``gptlab bench model`` prints the measured peak beside it on a GPU.
"""
from __future__ import annotations

from typing import Any

from ..plugin.components import PositionalContext
from ..plugin.hookspecs import KINDS

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def estimate_memory(model: Any, batch_size: int, seq_len: int, dtype: str = "float32",
                    gradient_checkpointing: bool | None = None, flash: bool | None = None,
                    compiled: bool = False) -> dict:
    """Bytes by category for training ``model`` on (batch_size, seq_len) batches with AdamW.

    dtype is the activation dtype (bfloat16 under autocast); weights, gradients and optimizer
    state stay float32. ``flash`` (default: sdpa attention with no score bias) drops the stored
    (heads x T x T) attention matrices. ``compiled``: the step runs under torch.compile, which fuses
    the loss into the head (the logits and their gradient stay in the activation dtype); eager
    autocast also keeps a float32 copy of the logits and their float32 log-probabilities. Returns
    weights, gradients, optimizer, activations, total. Measured on an H200 (GPT-2 124M, T=1024,
    bf16): within 4-10% below the allocator's peak (benchmarks/RESULTS.md).
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}")
    act_bytes = _DTYPE_BYTES[dtype]
    cfg = model.config
    if gradient_checkpointing is None:
        gradient_checkpointing = cfg.gradient_checkpointing
    attention = model.first_built.get("attention")
    if flash is None:
        flash = _fused_attention(model, attention)
    n_params = model.num_parameters()
    activations = _activation_bytes(model, attention, batch_size, seq_len, act_bytes, flash,
                                    gradient_checkpointing, compiled)
    weights = n_params * 4
    out = {
        "parameters": n_params,
        "weights": weights,
        "gradients": weights,
        "optimizer": 2 * weights,  # AdamW: exp_avg and exp_avg_sq
        "activations": int(activations),
    }
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def _fused_attention(model: Any, attention: Any) -> bool:
    """Whether attention runs a fused kernel (sdpa, no score bias), which never stores the
    (heads x T x T) attention matrices."""
    provides = KINDS["position"].attr(type(model.position), "provides")
    kernel_path = KINDS["attention"].attr(attention, "kernel_path")
    fused = kernel_path is not None and kernel_path(PositionalContext(0, 1)) != "explicit"
    return "score_bias" not in provides and fused


def _activation_bytes(model: Any, attention: Any, batch_size: int, seq_len: int, act_bytes: int, flash: bool,
                      gradient_checkpointing: bool, compiled: bool) -> int | float:
    """Bytes autograd keeps for the backward pass of one batch (the Korthikanti et al. accounting)."""
    cfg = model.config
    mlp = model.first_built.get("activation")
    b, s, h, a, L, V = batch_size, seq_len, cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.padded_vocab
    ff = KINDS["activation"].attr(mlp, "hidden_dim") or 4 * h
    gated = bool(KINDS["activation"].attr(mlp, "gated"))
    dropout = cfg.drop_rate > 0
    tokens = b * s
    # query and key/value widths (head_dim and grouped-query heads can make them differ from h)
    q_width = a * cfg.head_size
    kv_width = getattr(attention, "n_kv_heads", a) * cfg.head_size
    # Per layer, elements saved for backward: norm inputs (2h), q/k/v, attention output (q width),
    # MLP input (h) and, inside the MLP, the activation input and output (2ff; gated: 3ff + ff).
    elems = tokens * (2 * h + q_width + 2 * kv_width + q_width + h + h + (4 * ff if gated else 2 * ff))
    mask_bytes = tokens * 2 * h if dropout else 0  # residual dropout masks, 1 byte each
    attn = 0
    if not flash:  # softmax output, dropout output and mask of the (a x s x s) score matrix
        attn = b * a * s * s * (act_bytes * (2 if dropout else 1) + (1 if dropout else 0))
    per_layer = elems * act_bytes + mask_bytes + attn
    # Embedding output and final norm input; the logits: with the loss fused (compiled), the logits
    # and their gradient in the activation dtype; eager, the logits plus a float32 copy and float32
    # log-probabilities (the gradient reuses their memory).
    logit_bytes = 2 * act_bytes if compiled else act_bytes + 8
    outside = tokens * h * act_bytes * 2 + tokens * V * logit_bytes
    if gradient_checkpointing:
        return L * tokens * h * act_bytes + per_layer + outside
    return L * per_layer + outside
