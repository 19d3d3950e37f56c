"""Attention 'sdpa': torch's fused scaled_dot_product_attention (flash kernel when no score bias)."""
import torch
import torch.nn.functional as F

import gptlab
from gptlab import CausalSelfAttention


class SDPAAttention(CausalSelfAttention):
    """Causal attention through F.scaled_dot_product_attention; flash-eligible unless a score bias is set."""

    accepts = frozenset({"rotation", "score_bias"})  # the base rotates; attend adds the bias as a mask
    computes = "causal_softmax"  # vanilla's function, another kernel

    def attend(self, q, k, v, ctx):
        k, v = self.expand_kv(k), self.expand_kv(v)
        p = self.dropout if self.training else 0.0
        if self.softcap is not None:  # no fused kernel caps the scores: the explicit path
            weights = F.dropout(torch.softmax(self.scores(q, k, ctx), dim=-1), p, self.training)
            return weights @ v
        plain = ctx.score_bias is None and self.window is None
        if plain and ctx.offset == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if plain and ctx.q_len == 1:  # one new token sees the whole cache
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        if ctx.score_bias is None:
            mask = self.allowed(ctx, q.device)
        else:
            mask = ctx.masked_bias(q.dtype, q.device, self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    def kernel_path(self, ctx):
        if self.softcap is not None:
            return "explicit (soft-capped scores: no fused kernel caps them)"
        if ctx.score_bias is None and self.window is None:
            return "flash-eligible (causal, no mask)"
        return "mask (sliding window or score bias): memory-efficient or math kernel, not flash"


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "sdpa", SDPAAttention)
