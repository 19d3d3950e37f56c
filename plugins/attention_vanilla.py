"""Attention 'vanilla': explicit masked softmax, the readable reference implementation."""
from typing import Annotated, Optional

import torch

import gptlab
from gptlab import CausalSelfAttention, Range


class VanillaAttention(CausalSelfAttention):
    """Causal attention as written in the paper: softmax(QK^T/sqrt(d) + bias, masked) V."""

    accepts = frozenset({"rotation", "score_bias"})  # the base rotates; attend adds the bias to the scores
    computes = "causal_softmax"  # sdpa's function, another kernel

    def __init__(self, cfg, n_kv_heads: Annotated[Optional[int], Range(ge=1)] = None, qk_norm: Optional[str] = None,
                 qk_norm_scale: bool = True, softcap: Annotated[Optional[float], Range(gt=0)] = None,
                 window: Annotated[Optional[int], Range(ge=1)] = None):
        super().__init__(cfg, n_kv_heads, qk_norm, qk_norm_scale, softcap, window)
        self.attn_drop = torch.nn.Dropout(cfg.drop_rate)

    def attend(self, q, k, v, ctx):
        k, v = self.expand_kv(k), self.expand_kv(v)
        weights = self.attn_drop(torch.softmax(self.scores(q, k, ctx), dim=-1))
        return weights @ v


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "vanilla", VanillaAttention)
