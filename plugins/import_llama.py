"""Importers 'llama' and 'mistral': RMSNorm pre-norm blocks, rotary positions, a SwiGLU MLP and
grouped-query attention, as Hugging Face stores them.

Hugging Face keeps q, k and v (and the MLP's gate and up) as separate matrices; gptlab fuses each
group into one parameter (``attn.qkv`` rows [q; k; v], ``mlp.fc`` rows [gate; up]), so each
tensor fills a block of rows. Mistral is Llama plus a sliding attention window, which gptlab
reproduces only when the window covers the whole context.
"""
import gptlab
from gptlab import MAX_WIDTH, HFConfig, HFExport, HFImport, fused_rows, rope_to_hf

# transformers' LlamaConfig defaults for the keys that shape the model
DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0}


def llama(hf_config, source):
    """Hugging Face Llama (model_type llama): RMSNorm, rope, SwiGLU, grouped-query attention."""
    hf = HFConfig(hf_config, source, DEFAULTS)
    hf.choice("hidden_act", {"silu": "swiglu"})
    emb, heads = hf.width("hidden_size"), hf.width("num_attention_heads")
    kv = hf.width("num_key_value_heads", heads)
    if heads % kv:
        raise hf.fail("num_key_value_heads", f"({kv}) must divide num_attention_heads ({heads})")
    head_dim = hf.width("head_dim", emb // heads)
    if heads * head_dim > MAX_WIDTH:
        raise hf.fail("head_dim", f"x num_attention_heads is {heads * head_dim:,}, more than the {MAX_WIDTH:,} gptlab reads")
    attn_bias, mlp_bias, tied = hf.flag("attention_bias"), hf.flag("mlp_bias"), hf.flag("tie_word_embeddings")
    hidden = hf.width("intermediate_size")
    cfg = {"vocab_size": hf.integer("vocab_size"), "context_length": hf.integer("max_position_embeddings"),
           "emb_dim": emb, "n_heads": heads, "n_layers": hf.layers("num_hidden_layers"),
           "drop_rate": hf.dropout("attention_dropout"), "qkv_bias": attn_bias, "bias": False,
           "attn_out_bias": attn_bias, "mlp_bias": mlp_bias, "tie_embeddings": tied,
           "attention": "sdpa" if kv == heads else {"name": "sdpa", "n_kv_heads": kv},
           "position": {"name": "rope", **hf.rope_options()}, "norm": {"name": "rmsnorm", "eps": hf.number("rms_norm_eps", positive=True)},
           "norm_placement": "pre", "activation": "swiglu", "ff_dim": hidden}
    if head_dim * heads != emb:
        cfg["head_dim"] = head_dim
    q, k, v = fused_rows(heads * head_dim, kv * head_dim, kv * head_dim)
    gate, up = fused_rows(hidden, hidden)
    tensors = {"embed_tokens.weight": ("tok_emb.weight", False), "norm.weight": ("final_norm.weight", False)}
    if not tied:
        tensors["lm_head.weight"] = ("head.weight", False)
    for i in range(cfg["n_layers"]):
        a, b = f"layers.{i}.", f"blocks.{i}."
        parts = {"self_attn.q_proj": ("attn.qkv", q), "self_attn.k_proj": ("attn.qkv", k),
                 "self_attn.v_proj": ("attn.qkv", v), "self_attn.o_proj": ("attn.out_proj", None),
                 "mlp.gate_proj": ("mlp.fc", gate), "mlp.up_proj": ("mlp.fc", up), "mlp.down_proj": ("mlp.proj", None)}
        for hf_name, (ours, rows) in parts.items():
            tensors[a + hf_name + ".weight"] = (b + ours + ".weight", False, rows)
            if (attn_bias if hf_name.startswith("self_attn") else mlp_bias):
                tensors[a + hf_name + ".bias"] = (b + ours + ".bias", False, rows)
        tensors[a + "input_layernorm.weight"] = (b + "norm1.weight", False)
        tensors[a + "post_attention_layernorm.weight"] = (b + "norm2.weight", False)
    return HFImport(config=cfg, tensors=tensors, prefix="model.", outside_prefix=("lm_head.weight",),
                    ignore_suffixes=(".rotary_emb.inv_freq",), tied_head="lm_head.weight" if tied else None)


def mistral(hf_config, source):
    """Hugging Face Mistral (model_type mistral): Llama's layout; a sliding window only if it spans the context."""
    hf = HFConfig(hf_config, source, {**DEFAULTS, "max_position_embeddings": 131072})
    window, context = hf.get("sliding_window"), hf.integer("max_position_embeddings")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < context):
        raise hf.fail("sliding_window", f"={window!r} is not supported (gptlab attends to the whole context; "
                                         f"null, or a window >= max_position_embeddings {context}, loads)")
    return llama({**DEFAULTS, "max_position_embeddings": 131072, **hf_config}, source)


def to_hf(cfg):
    """The Llama config.json for a gptlab model with rope, rmsnorm, pre-norm and swiglu."""
    check = HFExport(cfg, "Llama")
    kv = check.attention(grouped=True)
    _, rope = check.one_of("position", ("rope",), ("base", "scaling", "factor", "low_freq_factor", "high_freq_factor",
                                                   "original_context_length"))
    check.one_of("norm_placement", ("pre",))
    eps = check.norm_eps(("rmsnorm",))
    _, opts = check.one_of("activation", ("swiglu",), ("hidden_dim",))
    check.expect("embedding_norm", False, "has no norm on the embeddings")
    hidden = opts.get("hidden_dim") or cfg.get("ff_dim") or int(round(8 * cfg["emb_dim"] / 3))
    attn_bias = cfg["qkv_bias"] or check.bias("attn_out")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["emb_dim"], "intermediate_size": hidden, "num_hidden_layers": cfg["n_layers"],
            "num_attention_heads": cfg["n_heads"], "num_key_value_heads": kv or cfg["n_heads"],
            "head_dim": check.head_dim(), "hidden_act": "silu", "max_position_embeddings": cfg["context_length"],
            "rms_norm_eps": eps, "rope_parameters": rope_to_hf(rope, "Llama"), "attention_bias": attn_bias,
            "mlp_bias": check.bias("mlp"), "attention_dropout": cfg["drop_rate"],
            "tie_word_embeddings": cfg["tie_embeddings"]}


llama.to_hf = to_hf


@gptlab.hookimpl
def gptlab_register(register):
    register("importer", "llama", llama)
    register("importer", "mistral", mistral)
