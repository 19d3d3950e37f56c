"""Importer 'gpt2': Hugging Face GPT-2 checkpoints, as the built-in components lay them out.

Two things differ between the layouts: parameter names (``h.3.attn.c_attn`` here is
``blocks.3.attn.qkv``) and weight orientation (GPT-2 uses Conv1D, stored (in, out), where
nn.Linear stores (out, in)). HF config switches gptlab has no equivalent for are refused, not
ignored. Reading the files and accounting for every tensor is ``gptlab.hf.checkpoint``'s job.
"""
from typing import Any

import gptlab
from gptlab import MAX_WIDTH, ConfigError, HFExport, HFImport, component
from gptlab.config.model import MAX_LAYERS
from gptlab.hf.helpers import finite, shown, shown_json

# Values transformers' GPT2Config assumes for keys a config.json leaves out; using the same ones
# means a sparse config.json gives the model transformers itself would build from it.
_HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1,
                "layer_norm_epsilon": 1e-5}

#: <|endoftext|> in GPT-2's vocabulary: its config.json's bos and eos (transformers' GPT2Config default)
GPT2_END_OF_TEXT = 50256

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# HF switches that change the computation, with the only value gptlab reproduces.
_FIXED = {
    "scale_attn_by_inverse_layer_idx": (False, "gptlab does not scale attention scores per layer"),
    "reorder_and_upcast_attn": (False, "gptlab has no upcast/reordered attention path"),
    "scale_attn_weights": (True, "gptlab always scales attention scores by 1/sqrt(head_dim)"),
    "add_cross_attention": (False, "gptlab models are decoder-only, with no cross-attention"),
    "tie_word_embeddings": (True, "the loader builds a tied head, as GPT-2 has"),
}

# Per-block tensors: HF suffix -> (gptlab suffix, stored as Conv1D and so needs a transpose).
_BLOCK_KEYS = {
    "ln_1.weight": ("norm1.weight", False), "ln_1.bias": ("norm1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True), "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.out_proj.weight", True), "attn.c_proj.bias": ("attn.out_proj.bias", False),
    "ln_2.weight": ("norm2.weight", False), "ln_2.bias": ("norm2.bias", False),
    "mlp.c_fc.weight": ("mlp.fc.weight", True), "mlp.c_fc.bias": ("mlp.fc.bias", False),
    "mlp.c_proj.weight": ("mlp.proj.weight", True), "mlp.c_proj.bias": ("mlp.proj.bias", False),
}
_TOP_KEYS = {
    "wte.weight": ("tok_emb.weight", False), "wpe.weight": ("position.emb.weight", False),
    "ln_f.weight": ("final_norm.weight", False), "ln_f.bias": ("final_norm.bias", False),
}

def config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Translate an HF GPT-2 config dict into a gptlab model config dict.

    ``source`` only labels error messages. Settings gptlab cannot express raise ConfigError
    naming the key, since loading anyway would give a model that computes something else.
    """
    def get(key: str) -> Any:
        return hf.get(key, _HF_DEFAULTS.get(key))

    def integer(key: str, value: Any, most: Any = None, what: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {shown(value)}")
        if most is not None and value > most:
            raise ConfigError(f"{source}: {key} is {shown(value)}, more than the {most:,}{what} gptlab reads")
        return value

    for key, (ok, why) in _FIXED.items():
        if key in hf and hf[key] != ok:
            raise ConfigError(f"{source}: {key}={shown_json(hf[key])} is not supported ({why})")

    act = get("activation_function")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: activation_function {shown(act)} is not supported; "
                          f"expected one of {', '.join(sorted(_ACTIVATIONS))}")
    # Old configs carry n_ctx beside n_positions; n_positions sizes the position table.
    ctx_key = "n_positions" if "n_positions" in hf or "n_ctx" not in hf else "n_ctx"
    eps = get("layer_norm_epsilon")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not finite(eps) or eps <= 0:
        raise ConfigError(f"{source}: layer_norm_epsilon must be a finite positive number, got {shown(eps)}")
    drop = get("resid_pdrop")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise ConfigError(f"{source}: resid_pdrop must be a dropout probability in [0, 1), got {shown(drop)}")

    cfg: dict[str, Any] = {
        "vocab_size": integer("vocab_size", get("vocab_size")),
        "context_length": integer(ctx_key, get(ctx_key)),
        "emb_dim": integer("n_embd", get("n_embd"), MAX_WIDTH),
        "n_heads": integer("n_head", get("n_head"), MAX_WIDTH),
        "n_layers": integer("n_layer", get("n_layer"), MAX_LAYERS, " layers"),
        "drop_rate": float(drop),
        "qkv_bias": True,
        "bias": True,
        "tie_embeddings": True,
        "attention": "sdpa",
        "position": "learned",
        "norm": "layernorm" if eps == 1e-5 else {"name": "layernorm", "eps": float(eps)},
        "norm_placement": "pre",
        "activation": _ACTIVATIONS[act],
    }
    n_inner = get("n_inner")
    if n_inner is not None:
        cfg["ff_dim"] = integer("n_inner", n_inner, MAX_WIDTH)
    return cfg



def tensor_names(n_layers: int) -> dict[str, tuple[str, bool]]:
    """HF tensor name (without 'transformer.') -> (gptlab parameter name, needs transpose)."""
    names = dict(_TOP_KEYS)
    for i in range(n_layers):
        for hf_suffix, (ours, transpose) in _BLOCK_KEYS.items():
            names[f"h.{i}.{hf_suffix}"] = (f"blocks.{i}.{ours}", transpose)
    return names


def gpt2(hf_config, source):
    """Hugging Face GPT-2 (model_type gpt2): pre-LN, learned positions, Conv1D weights, tied head."""
    cfg = config_from_hf(hf_config, source)
    return HFImport(config=cfg, tensors=tensor_names(cfg["n_layers"]), prefix="transformer.",
                    ignore_suffixes=(".attn.bias", ".attn.masked_bias"), tied_head="lm_head.weight")


def to_hf(cfg):
    """The GPT-2 config.json for a gptlab model, or ConfigError naming what GPT-2 cannot hold.

    GPT-2 has every bias; a gptlab model without some is written with those biases zero. Its
    bos/eos are GPT-2's <|endoftext|> (50256); the export keeps them only inside the model's
    vocabulary, or replaces them with the run's own tokenizer's (gptlab.hf.checkpoint.special_token_ids)."""
    check = HFExport(cfg, "GPT-2")
    check.attention(grouped=False)
    check.one_of("position", ("learned",))
    check.one_of("norm_placement", ("pre",))
    eps = check.norm_eps(("layernorm",))
    act, _ = check.one_of("activation", tuple(_TO_HF), ("hidden_dim",))
    check.expect("tie_embeddings", True, "ties its output head to the token embedding")
    check.expect("embedding_norm", False, "has no norm on the embeddings")
    check.plain_head_dim()
    hidden = component(cfg, "activation")[1].get("hidden_dim") or cfg.get("ff_dim")
    drop = cfg["drop_rate"]
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg["vocab_size"],
            "n_positions": cfg["context_length"], "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"],
            "n_head": cfg["n_heads"], "n_inner": hidden, "activation_function": _TO_HF[act],
            "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop, "layer_norm_epsilon": eps,
            "tie_word_embeddings": True, "bos_token_id": GPT2_END_OF_TEXT, "eos_token_id": GPT2_END_OF_TEXT}


gpt2.to_hf = to_hf


@gptlab.hookimpl
def gptlab_register(register):
    register("importer", "gpt2", gpt2)
