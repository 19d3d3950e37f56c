"""Importer 'openai-gpt': the original GPT (Radford et al. 2018) as Hugging Face stores it.

Post-LN blocks (norm after each residual add, no final norm), learned positions, Conv1D weights
stored (in, out), every bias, a tied head.
"""
import gptlab
from gptlab import HFConfig, HFExport, HFImport

# transformers' OpenAIGPTConfig defaults, for keys a config.json leaves out
DEFAULTS = {"vocab_size": 40478, "n_positions": 512, "n_embd": 768, "n_layer": 12, "n_head": 12, "afn": "gelu",
            "resid_pdrop": 0.1, "layer_norm_epsilon": 1e-5}

# transformers' OpenAI GPT reads afn "gelu" as the tanh approximation (its own table, not ACT2FN)
ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}

BLOCK = {"attn.c_attn.weight": ("attn.qkv.weight", True), "attn.c_attn.bias": ("attn.qkv.bias", False),
         "attn.c_proj.weight": ("attn.out_proj.weight", True), "attn.c_proj.bias": ("attn.out_proj.bias", False),
         "ln_1.weight": ("norm1.weight", False), "ln_1.bias": ("norm1.bias", False),
         "mlp.c_fc.weight": ("mlp.fc.weight", True), "mlp.c_fc.bias": ("mlp.fc.bias", False),
         "mlp.c_proj.weight": ("mlp.proj.weight", True), "mlp.c_proj.bias": ("mlp.proj.bias", False),
         "ln_2.weight": ("norm2.weight", False), "ln_2.bias": ("norm2.bias", False)}


def openai_gpt(hf_config, source):
    """Hugging Face OpenAI GPT (model_type openai-gpt): post-LN, learned positions, no final norm."""
    hf = HFConfig(hf_config, source, DEFAULTS)
    hf.fixed("tie_word_embeddings", True, "the loader builds a tied head, as GPT has")
    cfg = {"vocab_size": hf.integer("vocab_size"), "context_length": hf.integer("n_positions"),
           "emb_dim": hf.width("n_embd"), "n_heads": hf.width("n_head"), "n_layers": hf.layers("n_layer"),
           "drop_rate": hf.dropout("resid_pdrop"), "qkv_bias": True, "bias": True, "tie_embeddings": True,
           "attention": "sdpa", "position": "learned", "norm": hf.norm("layernorm", "layer_norm_epsilon"),
           "norm_placement": "post", "activation": hf.choice("afn", ACTIVATIONS)}
    tensors = {"tokens_embed.weight": ("tok_emb.weight", False), "positions_embed.weight": ("position.emb.weight", False)}
    for i in range(cfg["n_layers"]):
        tensors.update({f"h.{i}.{k}": (f"blocks.{i}.{t}", tr) for k, (t, tr) in BLOCK.items()})
    return HFImport(config=cfg, tensors=tensors, prefix="transformer.", ignore_suffixes=(".attn.bias",),
                    tied_head="lm_head.weight")


def to_hf(cfg):
    """The OpenAI GPT config.json for a post-LN, learned-position gptlab model (absent biases written as zeros)."""
    check = HFExport(cfg, "OpenAI GPT")
    check.attention(grouped=False)
    check.one_of("position", ("learned",))
    check.one_of("norm_placement", ("post",))
    eps = check.norm_eps(("layernorm",))
    act, opts = check.one_of("activation", tuple(TO_HF), ("hidden_dim",))
    if (opts.get("hidden_dim") or cfg.get("ff_dim") or 4 * cfg["emb_dim"]) != 4 * cfg["emb_dim"]:
        raise gptlab.ConfigError(f"activation '{act}' width: OpenAI GPT's MLP is 4 x emb_dim wide")
    check.expect("tie_embeddings", True, "ties its output head to the token embedding")
    check.expect("embedding_norm", False, "has no norm on the embeddings")
    check.plain_head_dim()
    drop = cfg["drop_rate"]
    return {"model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "vocab_size": cfg["vocab_size"],
            "n_positions": cfg["context_length"], "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"],
            "n_head": cfg["n_heads"], "afn": TO_HF[act], "resid_pdrop": drop, "embd_pdrop": drop,
            "attn_pdrop": drop, "layer_norm_epsilon": eps, "tie_word_embeddings": True}


openai_gpt.to_hf = to_hf


@gptlab.hookimpl
def gptlab_register(register):
    register("importer", "openai-gpt", openai_gpt)
