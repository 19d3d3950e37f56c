"""Norm placement 'sandwich' (CogView, Ding et al. 2021): norm before and after each sublayer.

    x ──┬─ norm ─ attn ─ norm ─ drop ─(+)──┬─ norm ─ mlp ─ norm ─ drop ─(+)──>
        └──────────────────────────────────┘└─────────────────────────────────┘
"""
from torch import nn

import gptlab


class SandwichNormBlock(nn.Module):
    """Sandwich-LN: x + norm(f(norm(x))); bounds what each sublayer adds to the residual stream."""

    final_norm = True
    norm_count = staticmethod(lambda options: 4)  # two around each sublayer
    #: role -> attribute, what importers map tensors onto (gptlab.plugin.contract)
    param_names = {"attn": "attn", "mlp": "mlp", "norm1_in": "norm1_in", "norm1_out": "norm1_out",
                   "norm2_in": "norm2_in", "norm2_out": "norm2_out"}

    def __init__(self, cfg, attention, mlp, norm):
        super().__init__()
        self.norm1_in, self.attn, self.norm1_out = norm(cfg.emb_dim), attention(), norm(cfg.emb_dim)
        self.norm2_in, self.mlp, self.norm2_out = norm(cfg.emb_dim), mlp(), norm(cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ctx, cache=None):
        x = x + self.drop(self.norm1_out(self.attn(self.norm1_in(x), ctx, cache)))
        return x + self.drop(self.norm2_out(self.mlp(self.norm2_in(x))))


@gptlab.hookimpl
def gptlab_register(register):
    register("norm_placement", "sandwich", SandwichNormBlock)
