"""Importer 'bloom': BLOOM as Hugging Face stores it.

ALiBi instead of position embeddings, a LayerNorm on the token embeddings (``embedding_norm``),
pre-norm blocks with tanh-approximated GELU, every bias, a tied head. Like GPT-NeoX, the fused
query_key_value matrix interleaves q, k and v per head.
"""
import gptlab
from gptlab import HFConfig, HFExport, HFImport, per_head_rows

# transformers' BloomConfig defaults for the keys that shape the model
DEFAULTS = {"vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8, "layer_norm_epsilon": 1e-5,
            "hidden_dropout": 0.0, "tie_word_embeddings": True}
#: ALiBi has no length limit; gptlab still needs a training length. BLOOM was trained at 2048.
DEFAULT_CONTEXT = 2048



def bloom(hf_config, source):
    """Hugging Face BLOOM (model_type bloom): ALiBi, a norm on the embeddings, tied head."""
    hf = HFConfig(hf_config, source, DEFAULTS)
    hf.fixed("apply_residual_connection_post_layernorm", False,
             "gptlab's pre-norm blocks add the block input, not the normed input, to the residual")
    hf.fixed("tie_word_embeddings", True, "the loader builds a tied head, as BLOOM has")
    emb = hf.width("hidden_size", hf.get("n_embed"))
    heads = hf.width("n_head", hf.get("num_attention_heads"))
    if emb % heads:
        raise hf.fail("hidden_size", f"({emb}) must be divisible by n_head ({heads})")
    cfg = {"vocab_size": hf.integer("vocab_size"), "context_length": hf.integer("seq_length", DEFAULT_CONTEXT),
           "emb_dim": emb, "n_heads": heads, "n_layers": hf.layers("n_layer", hf.get("num_hidden_layers")),
           "drop_rate": hf.dropout("hidden_dropout"), "qkv_bias": True, "bias": True, "tie_embeddings": True,
           "embedding_norm": True, "attention": "sdpa", "position": "alibi",
           "norm": hf.norm("layernorm", "layer_norm_epsilon"), "norm_placement": "pre", "activation": "gelu_tanh"}
    rows = per_head_rows(heads, emb // heads)
    tensors = {"word_embeddings.weight": ("tok_emb.weight", False)}
    for p in ("weight", "bias"):
        tensors[f"word_embeddings_layernorm.{p}"] = (f"embedding_norm.{p}", False)
        tensors[f"ln_f.{p}"] = (f"final_norm.{p}", False)
    for i in range(cfg["n_layers"]):
        a, b = f"h.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            tensors[f"{a}self_attention.query_key_value.{p}"] = (f"{b}attn.qkv.{p}", False, rows)
            for hf_name, ours in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                                  ("self_attention.dense", "attn.out_proj"), ("mlp.dense_h_to_4h", "mlp.fc"),
                                  ("mlp.dense_4h_to_h", "mlp.proj")):
                tensors[f"{a}{hf_name}.{p}"] = (f"{b}{ours}.{p}", False)
    return HFImport(config=cfg, tensors=tensors, prefix="transformer.", tied_head="lm_head.weight")


def to_hf(cfg):
    """The BLOOM config.json for a gptlab model with alibi, an embedding norm, pre-LN and gelu_tanh."""
    check = HFExport(cfg, "BLOOM")
    check.attention(grouped=False)
    check.one_of("position", ("alibi",))
    check.one_of("norm_placement", ("pre",))
    eps = check.norm_eps(("layernorm",))
    _, opts = check.one_of("activation", ("gelu_tanh",), ("hidden_dim",))
    if (opts.get("hidden_dim") or cfg.get("ff_dim") or 4 * cfg["emb_dim"]) != 4 * cfg["emb_dim"]:
        raise gptlab.ConfigError("activation 'gelu_tanh' width: BLOOM's MLP is 4 x emb_dim wide")
    check.expect("embedding_norm", True, "normalises the token embeddings (set model.embedding_norm: true)")
    check.expect("tie_embeddings", True, "ties its output head to the token embedding")
    check.plain_head_dim()
    return {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["emb_dim"], "n_layer": cfg["n_layers"], "n_head": cfg["n_heads"],
            "layer_norm_epsilon": eps, "hidden_dropout": cfg["drop_rate"], "attention_dropout": cfg["drop_rate"],
            "seq_length": cfg["context_length"], "apply_residual_connection_post_layernorm": False,
            "tie_word_embeddings": True}


bloom.to_hf = to_hf


@gptlab.hookimpl
def gptlab_register(register):
    register("importer", "bloom", bloom)
