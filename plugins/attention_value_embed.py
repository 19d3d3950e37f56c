"""Attention 'value_embed': sdpa attention whose values are mixed with a token embedding of their
own, v <- a v + b E[token] with learned scalars a, b (value embeddings: modded-nanogpt, 2024;
nanochat's largest small-scale win, 2026). Use it in chosen layers with a layout, as modded-nanogpt
does in its first and last layers: ``layers: [{at: [0, 1, -2, -1], attention: value_embed}]``.

It needs the token ids inside attention: ``ctx.tokens``, which the model sets for every layer,
read in the ``transform_qkv`` seam. The table is an embedding (optimizer role ``embeddings``) of
padded_vocab x (n_kv_heads x head width) parameters per layer that uses it.
"""
from typing import Annotated, Optional

import torch
from torch import nn

import gptlab
from gptlab import Range
from gptlab.builtin_plugins.attention_sdpa import SDPAAttention
from gptlab.plugin.components import split_heads


class ValueEmbedAttention(SDPAAttention):
    """sdpa attention with a per-layer value embedding mixed into v (modded-nanogpt)."""

    computes = None  # not the plain causal softmax of the projected values: no exported family holds it

    def __init__(self, cfg, n_kv_heads: Annotated[Optional[int], Range(ge=1)] = None, qk_norm: Optional[str] = None,
                 qk_norm_scale: bool = True, softcap: Annotated[Optional[float], Range(gt=0)] = None,
                 window: Annotated[Optional[int], Range(ge=1)] = None, mix: list = (0.5, 0.5)):
        super().__init__(cfg, n_kv_heads, qk_norm, qk_norm_scale, softcap, window)
        self.value_emb = nn.Embedding(cfg.padded_vocab, self.n_kv_heads * self.head_dim)
        self.mix = nn.Parameter(torch.tensor([float(m) for m in mix]))  # (a, b): v <- a v + b E[token]
        self.param_names = {**type(self).param_names, "value_emb": "value_emb"}

    @classmethod
    def check(cls, cfg, n_kv_heads=None, qk_norm=None, mix=(0.5, 0.5)):
        super().check(cfg, n_kv_heads, qk_norm)
        if len(mix) != 2 or not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in mix):
            raise gptlab.ConfigError(f"option mix must be two numbers (the weights of v and of its embedding), "
                                     f"got {list(mix)!r}")

    @classmethod
    def parameter_count(cls, cfg, n_kv_heads=None, **options):
        table = cfg.padded_vocab * (n_kv_heads or cfg.n_heads) * cfg.head_size
        return super().parameter_count(cfg, n_kv_heads, **options) + table + 2  # + the embedding and mix

    def transform_qkv(self, q, k, v, ctx):
        q, k, v = super().transform_qkv(q, k, v, ctx)
        extra = split_heads(self.value_emb(ctx.tokens), self.n_kv_heads).to(v.dtype)
        return q, k, self.mix[0] * v + self.mix[1] * extra


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "value_embed", ValueEmbedAttention)
