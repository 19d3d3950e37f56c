"""Norm placement 'post' (original Transformer): normalise after each residual add, no final norm.

    x ─┬─ attn ─ drop ─(+)─ norm ─┬─ mlp ─ drop ─(+)─ norm ──>
       └──────────────────┘       └─────────────────┘
"""
from torch import nn

import gptlab


class PostNormBlock(nn.Module):
    """Post-LN: norm(x + f(x)); known to need learning-rate warmup at depth (Xiong et al. 2020)."""

    final_norm = False
    #: role -> attribute, what importers map tensors onto (gptlab.plugin.contract)
    param_names = {"attn": "attn", "mlp": "mlp", "norm1": "norm1", "norm2": "norm2"}

    def __init__(self, cfg, attention, mlp, norm):
        super().__init__()
        self.attn, self.norm1 = attention(), norm(cfg.emb_dim)
        self.mlp, self.norm2 = mlp(), norm(cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ctx, cache=None):
        x = self.norm1(x + self.drop(self.attn(x, ctx, cache)))
        return self.norm2(x + self.drop(self.mlp(x)))


@gptlab.hookimpl
def gptlab_register(register):
    register("norm_placement", "post", PostNormBlock)
