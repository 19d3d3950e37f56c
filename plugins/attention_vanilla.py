"""Attention 'vanilla': explicit masked softmax, the readable reference implementation."""
import math
from typing import Annotated, Optional

import torch

import gptlab
from gptlab import CausalSelfAttention, Range


class VanillaAttention(CausalSelfAttention):
    """Causal attention as written in the paper: softmax(QK^T/sqrt(d) + bias, masked) V."""

    accepts = frozenset({"rotation", "score_bias"})  # the base rotates; attend adds the bias to the scores
    computes = "causal_softmax"  # sdpa's function, another kernel

    def __init__(self, cfg, n_kv_heads: Annotated[Optional[int], Range(ge=1)] = None):
        super().__init__(cfg, n_kv_heads)
        self.attn_drop = torch.nn.Dropout(cfg.drop_rate)

    def attend(self, q, k, v, ctx):
        k, v = self.expand_kv(k), self.expand_kv(v)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if ctx.score_bias is not None:  # the bias with the causal mask folded in, built once per forward
            scores = scores + ctx.masked_bias(scores.dtype, q.device)
        else:
            scores = scores.masked_fill(~ctx.causal_mask(q.device), float("-inf"))
        weights = self.attn_drop(torch.softmax(scores, dim=-1))
        return weights @ v


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "vanilla", VanillaAttention)
