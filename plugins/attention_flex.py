"""Attentions 'flex', 'flex_alibi', 'flex_softcap', 'flex_window' and 'flex_document': causal
attention through torch's FlexAttention (torch.nn.attention.flex_attention, 2024), each variant a
score_mod or mask_mod of a few lines on gptlab.FlexAttention. On CUDA they train compiled; on the
CPU torch has no FlexAttention backward, so they evaluate and generate there but do not train."""
import math
from typing import Annotated, Optional

import torch

import gptlab
from gptlab import FlexAttention, Range

Heads = Annotated[Optional[int], Range(ge=1)]
Window = Annotated[Optional[int], Range(ge=1)]


class Flex(FlexAttention):
    """Causal softmax attention through FlexAttention (options softcap and window apply as mods)."""


class FlexALiBi(FlexAttention):
    """ALiBi as a score_mod: score - slope_h (q - kv), the slopes of Press et al. (2022); use with position none."""

    def __init__(self, cfg, n_kv_heads: Heads = None, qk_norm: Optional[str] = None, qk_norm_scale: bool = True,
                 softcap: Annotated[Optional[float], Range(gt=0)] = None, window: Window = None):
        super().__init__(cfg, n_kv_heads, qk_norm, qk_norm_scale, softcap, window)
        n = 2 ** math.floor(math.log2(cfg.n_heads))  # the paper's geometric slopes; extra heads interleave
        slopes = [2 ** (-8 * (i + 1) / n) for i in range(n)]
        slopes += [2 ** (-4 * (2 * i + 1) / n) for i in range(cfg.n_heads - n)]
        self.register_buffer("slopes", torch.tensor(slopes), persistent=False)

    def score_mod(self, score, b, h, q, kv):
        return score - self.slopes[h] * (q - kv)


class FlexSoftcap(FlexAttention):
    """Scores soft-capped as a score_mod: cap * tanh(score / cap) (Gemma 2)."""

    def __init__(self, cfg, cap: Annotated[float, Range(gt=0)] = 20.0, n_kv_heads: Heads = None,
                 qk_norm: Optional[str] = None, qk_norm_scale: bool = True, window: Window = None):
        super().__init__(cfg, n_kv_heads, qk_norm, qk_norm_scale, None, window)
        self.cap = cap

    def score_mod(self, score, b, h, q, kv):
        return self.cap * torch.tanh(score / self.cap)


class FlexWindow(FlexAttention):
    """A sliding window as a mask_mod: each query sees itself and the size - 1 keys before it."""

    def __init__(self, cfg, size: Annotated[int, Range(ge=1)] = 128, n_kv_heads: Heads = None,
                 qk_norm: Optional[str] = None, qk_norm_scale: bool = True,
                 softcap: Annotated[Optional[float], Range(gt=0)] = None):
        super().__init__(cfg, n_kv_heads, qk_norm, qk_norm_scale, softcap, None)
        self.size = size

    def mask_mod(self, b, h, q, kv):
        return q - kv < self.size


class FlexDocument(FlexAttention):
    """A document mask as a mask_mod: a query sees only its own document's keys; the separator
    token (the tokenizer's end-of-text id) ends a document, so packed documents never see each other."""

    def __init__(self, cfg, separator: Annotated[Optional[int], Range(ge=0)] = None, n_kv_heads: Heads = None,
                 qk_norm: Optional[str] = None, qk_norm_scale: bool = True,
                 softcap: Annotated[Optional[float], Range(gt=0)] = None, window: Window = None):
        super().__init__(cfg, n_kv_heads, qk_norm, qk_norm_scale, softcap, window)
        self.check(cfg, n_kv_heads, qk_norm, separator)
        self.separator = separator

    @classmethod
    def check(cls, cfg, n_kv_heads=None, qk_norm=None, separator=None):
        super().check(cfg, n_kv_heads, qk_norm)
        if separator is None or separator >= cfg.vocab_size:
            raise gptlab.ConfigError(f"option separator must be the tokenizer's end-of-text id, below vocab_size "
                                     f"{cfg.vocab_size} (char: its <|endoftext|> id; tiktoken gpt2: 50256), "
                                     f"got {separator!r}")

    def mask_mod(self, b, h, q, kv):
        ends = (self.ctx.seen_tokens == self.separator).int()
        doc = ends.cumsum(-1) - ends  # the separator belongs to the document it ends
        return doc[b, q] == doc[b, kv]


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "flex", Flex)
    register("attention", "flex_alibi", FlexALiBi)
    register("attention", "flex_softcap", FlexSoftcap)
    register("attention", "flex_window", FlexWindow)
    register("attention", "flex_document", FlexDocument)
