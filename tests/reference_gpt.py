"""An independent plain-torch GPT following the seeds' architecture (learned positions, pre-LN
LayerNorm, tanh GELU, separate q/k/v projections): what gptlab's default model must compute.

``gptlab_state_dict`` maps its weights onto the names of a gptlab model of the same config (with
``activation: gelu_tanh`` and ``tie_embeddings: false``), so the two can be compared logit for logit.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class RefLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class RefGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class RefMHA(nn.Module):
    def __init__(self, d, context, n_heads, qkv_bias):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.W_query = nn.Linear(d, d, bias=qkv_bias)
        self.W_key = nn.Linear(d, d, bias=qkv_bias)
        self.W_value = nn.Linear(d, d, bias=qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(context, context), diagonal=1))

    def forward(self, x):
        b, T, d = x.shape
        q = self.W_query(x).view(b, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, T, self.n_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:T, :T], -torch.inf)
        w = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, T, d))


class RefBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.att = RefMHA(d, cfg["context_length"], cfg["n_heads"], cfg["qkv_bias"])
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), RefGELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = RefLayerNorm(d), RefLayerNorm(d)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))


class RefGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.trf_blocks = nn.Sequential(*[RefBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RefLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def gptlab_state_dict(ref: RefGPT) -> dict:
    """``ref``'s weights (copies) under gptlab's parameter names; every gptlab key is mapped."""
    sd = {"tok_emb.weight": ref.tok_emb.weight, "position.emb.weight": ref.pos_emb.weight,
          "final_norm.weight": ref.final_norm.scale, "final_norm.bias": ref.final_norm.shift,
          "head.weight": ref.out_head.weight}
    for i, blk in enumerate(ref.trf_blocks):
        p = f"blocks.{i}."
        att = blk.att
        sd[p + "attn.qkv.weight"] = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
        if att.W_query.bias is not None:
            sd[p + "attn.qkv.bias"] = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = att.out_proj.weight, att.out_proj.bias
        sd[p + "mlp.fc.weight"], sd[p + "mlp.fc.bias"] = blk.ff[0].weight, blk.ff[0].bias
        sd[p + "mlp.proj.weight"], sd[p + "mlp.proj.bias"] = blk.ff[2].weight, blk.ff[2].bias
        for n in (1, 2):
            norm = getattr(blk, f"norm{n}")
            sd[p + f"norm{n}.weight"], sd[p + f"norm{n}.bias"] = norm.scale, norm.shift
    return {k: v.detach().clone() for k, v in sd.items()}
