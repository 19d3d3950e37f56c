"""Norm placement 'parallel' (GPT-J, PaLM): attention and MLP read the same normed input.

    x ──┬─ norm ─┬─ attn ─ drop ─┐
        │        └─ mlp ── drop ─(+)──>
        └────────────────────────┘
"""
from torch import nn

import gptlab


class ParallelBlock(nn.Module):
    """Parallel block: x + attn(norm(x)) + mlp(norm(x)), one norm per block."""

    final_norm = True

    def __init__(self, cfg, attention, mlp, norm):
        super().__init__()
        self.norm, self.attn, self.mlp = norm(cfg.emb_dim), attention(), mlp()
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ctx, cache=None):
        h = self.norm(x)
        return x + self.drop(self.attn(h, ctx, cache)) + self.drop(self.mlp(h))


@gptlab.hookimpl
def gptlab_register(register):
    register("norm_placement", "parallel", ParallelBlock)
