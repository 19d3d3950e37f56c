"""Position 'learned': a trained vector per absolute position, added to the token embeddings (GPT-2)."""
import torch
from torch import nn

import gptlab
from gptlab import PositionScheme


class LearnedPositions(PositionScheme):
    """Learned absolute position embeddings; cannot go past context_length."""

    provides = frozenset({"embedding"})
    param_names = {"emb": "emb"}  # the (context_length, emb_dim) table importers fill

    @staticmethod
    def parameter_count(cfg):
        """The table's size, for the size check before anything is built."""
        return cfg.context_length * cfg.emb_dim

    def __init__(self, cfg):
        super().__init__()
        self.max_length = cfg.context_length
        self.emb = nn.Embedding(cfg.context_length, cfg.emb_dim)

    def embed(self, x, offset):
        pos = torch.arange(offset, offset + x.shape[1], device=x.device)
        return x + self.emb(pos)


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "learned", LearnedPositions)
