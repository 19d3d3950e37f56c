"""Norm placement 'pre' (GPT-2): normalise the input of each sublayer, plus a final norm.

    x ──┬─ norm ─ attn ─ drop ─(+)──┬─ norm ─ mlp ─ drop ─(+)──>
        └───────────────────────────┘└──────────────────────────┘
"""
from torch import nn

import gptlab


class PreNormBlock(nn.Module):
    """Pre-LN: x + f(norm(x)) for attention then MLP; needs a final norm before the head."""

    final_norm = True
    #: role -> attribute, what importers map tensors onto (gptlab.plugin.contract)
    param_names = {"attn": "attn", "mlp": "mlp", "norm1": "norm1", "norm2": "norm2"}

    def __init__(self, cfg, attention, mlp, norm):
        super().__init__()
        self.norm1, self.attn = norm(cfg.emb_dim), attention()
        self.norm2, self.mlp = norm(cfg.emb_dim), mlp()
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ctx, cache=None):
        x = x + self.drop(self.attn(self.norm1(x), ctx, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


@gptlab.hookimpl
def gptlab_register(register):
    register("norm_placement", "pre", PreNormBlock)
