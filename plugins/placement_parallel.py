"""Norm placement 'parallel' (GPT-J, PaLM, GPT-NeoX): attention and MLP both read the block's input.

    x ──┬─ norm ─┬─ attn ─ drop ─┐          shared_norm: false (GPT-NeoX) gives each branch
        │        └─ mlp ── drop ─(+)──>     its own norm: attn(norm1(x)), mlp(norm2(x))
        └────────────────────────┘
"""
from torch import nn

import gptlab


class ParallelBlock(nn.Module):
    """Parallel block: x + attn(norm(x)) + mlp(norm(x)); shared_norm false: one norm per branch."""

    final_norm = True
    norm_count = staticmethod(lambda options: 1 if options.get("shared_norm", True) else 2)
    #: role -> attribute, what importers map tensors onto (gptlab.plugin.contract); the instance's
    #: names norm1 (attention's) and norm2 (the MLP's) instead of norm when shared_norm is false
    param_names = {"attn": "attn", "mlp": "mlp", "norm": "norm"}

    def __init__(self, cfg, attention, mlp, norm, shared_norm: bool = True):
        super().__init__()
        if shared_norm:
            self.norm = norm(cfg.emb_dim)
        else:
            self.norm1, self.norm2 = norm(cfg.emb_dim), norm(cfg.emb_dim)
            self.param_names = {"attn": "attn", "mlp": "mlp", "norm1": "norm1", "norm2": "norm2"}
        self.shared_norm = shared_norm
        self.attn, self.mlp = attention(), mlp()
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ctx, cache=None):
        if self.shared_norm:
            a = m = self.norm(x)
        else:
            a, m = self.norm1(x), self.norm2(x)
        return x + self.drop(self.attn(a, ctx, cache)) + self.drop(self.mlp(m))


@gptlab.hookimpl
def gptlab_register(register):
    register("norm_placement", "parallel", ParallelBlock)
