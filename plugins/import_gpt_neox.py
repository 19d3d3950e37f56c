"""Importer 'gpt_neox': GPT-NeoX and Pythia as Hugging Face stores them.

LayerNorm blocks that are parallel with a norm per branch (``use_parallel_residual``, the usual
case) or pre-norm, rotary positions on part of each head (``partial_rotary_factor``, formerly
``rotary_pct``; a quarter when config.json leaves both out, as transformers reads it), a plain MLP, an untied output head. The fused query_key_value matrix interleaves
per head ([q, k, v] for head 0, then head 1, ...); gptlab's ``attn.qkv`` holds all queries, then
all keys, then all values, so the rows are reordered on the way in and out.
"""
import gptlab
from gptlab import HFConfig, HFExport, HFImport, per_head_rows, rope_to_hf

# HF hidden_act -> gptlab activation of the plain MLP, and one HF name back for each
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}
TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}

# transformers' GPTNeoXConfig defaults for the keys that shape the model
DEFAULTS = {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
            "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "use_parallel_residual": True,
            "attention_bias": True, "hidden_dropout": 0.0}



def gpt_neox(hf_config, source):
    """Hugging Face GPT-NeoX (model_type gpt_neox): parallel blocks, partial rope, untied head."""
    hf = HFConfig(hf_config, source, DEFAULTS)
    emb, heads = hf.width("hidden_size"), hf.width("num_attention_heads")
    if emb % heads:
        raise hf.fail("hidden_size", f"({emb}) must be divisible by num_attention_heads ({heads})")
    parallel, tied, attn_bias = hf.flag("use_parallel_residual"), hf.flag("tie_word_embeddings"), hf.flag("attention_bias")
    cfg = {"vocab_size": hf.integer("vocab_size"), "context_length": hf.integer("max_position_embeddings"),
           "emb_dim": emb, "n_heads": heads, "n_layers": hf.layers("num_hidden_layers"),
           "drop_rate": hf.dropout("hidden_dropout"), "qkv_bias": attn_bias, "bias": True, "attn_out_bias": attn_bias,
           "tie_embeddings": tied, "attention": "sdpa",
           "position": {"name": "rope", **hf.rope_options(theta_keys=("rope_theta", "rotary_emb_base"),
                                                          fraction_keys=("rotary_pct",), default_fraction=0.25)},
           "norm": hf.norm("layernorm", "layer_norm_eps"),
           "norm_placement": {"name": "parallel", "shared_norm": False} if parallel else "pre",
           "activation": hf.choice("hidden_act", ACTIVATIONS), "ff_dim": hf.width("intermediate_size")}
    rows = per_head_rows(heads, emb // heads)
    tensors = {"embed_in.weight": ("tok_emb.weight", False), "final_layer_norm.weight": ("final_norm.weight", False),
               "final_layer_norm.bias": ("final_norm.bias", False)}
    if not tied:
        tensors["embed_out.weight"] = ("head.weight", False)
    for i in range(cfg["n_layers"]):
        a, b = f"layers.{i}.", f"blocks.{i}."
        tensors[a + "attention.query_key_value.weight"] = (b + "attn.qkv.weight", False, rows)
        tensors[a + "attention.dense.weight"] = (b + "attn.out_proj.weight", False)
        if attn_bias:
            tensors[a + "attention.query_key_value.bias"] = (b + "attn.qkv.bias", False, rows)
            tensors[a + "attention.dense.bias"] = (b + "attn.out_proj.bias", False)
        for hf_name, ours in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                              ("mlp.dense_h_to_4h", "mlp.fc"), ("mlp.dense_4h_to_h", "mlp.proj")):
            for p in ("weight", "bias"):
                tensors[f"{a}{hf_name}.{p}"] = (f"{b}{ours}.{p}", False)
    return HFImport(config=cfg, tensors=tensors, prefix="gpt_neox.", outside_prefix=("embed_out.weight",),
                    ignore_suffixes=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
                    tied_head="embed_out.weight" if tied else None)


def to_hf(cfg):
    """The GPT-NeoX config.json for a gptlab model with rope, layernorm and a parallel (norm per
    branch) or pre-norm block; absent MLP and norm biases are written as zeros."""
    check = HFExport(cfg, "GPT-NeoX")
    check.attention(grouped=False)
    _, rope = check.one_of("position", ("rope",), ("base", "fraction", "scaling", "factor", "low_freq_factor",
                                                   "high_freq_factor", "original_context_length"))
    placement, opts = check.one_of("norm_placement", ("parallel", "pre"), ("shared_norm",))
    if placement == "parallel" and opts.get("shared_norm", True):
        raise gptlab.ConfigError("norm_placement 'parallel' with one shared norm: GPT-NeoX has a norm per branch "
                                 "(shared_norm: false)")
    eps = check.norm_eps(("layernorm",))
    act, act_opts = check.one_of("activation", tuple(TO_HF), ("hidden_dim",))
    check.expect("embedding_norm", False, "has no norm on the embeddings")
    check.plain_head_dim()
    return {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["emb_dim"], "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
            "intermediate_size": act_opts.get("hidden_dim") or cfg.get("ff_dim") or 4 * cfg["emb_dim"],
            "hidden_act": TO_HF[act], "max_position_embeddings": cfg["context_length"], "layer_norm_eps": eps,
            "rope_parameters": rope_to_hf(rope, "GPT-NeoX", partial_ok=True),
            "use_parallel_residual": placement == "parallel",
            "attention_bias": cfg["qkv_bias"] or check.bias("attn_out"), "hidden_dropout": cfg["drop_rate"],
            "attention_dropout": cfg["drop_rate"], "tie_word_embeddings": cfg["tie_embeddings"]}


gpt_neox.to_hf = to_hf


@gptlab.hookimpl
def gptlab_register(register):
    register("importer", "gpt_neox", gpt_neox)
