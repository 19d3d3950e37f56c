"""Built-in gptlab variants. Each module here is an ordinary plugin, loaded like a user's own.

Only the modules in ``BUILTINS`` are gptlab's; any other file a user drops into this folder is
loaded as the user's plugin (the README tutorial does exactly that). After changing a built-in,
regenerate the listing manifest: ``python -m gptlab.plugin.manager``.
"""

BUILTINS = (
    "attention_sdpa", "attention_vanilla", "attention_value_embed", "attention_flex",
    "position_learned", "position_sinusoidal", "position_rope", "position_alibi", "position_none",
    "norm_layernorm", "norm_rmsnorm",
    "placement_pre", "placement_post", "placement_sandwich", "placement_parallel",
    "activation_mlp", "activation_gated", "activation_moe",
    "wiring_sequential", "wiring_unet", "wiring_x0_mix",
    "dataset_python_docs", "dataset_text", "dataset_tokens", "dataset_jsonl", "dataset_hf",
    "tokenizer_bytes", "tokenizer_char", "tokenizer_tiktoken", "tokenizer_bpe",
    "import_gpt2", "import_openai_gpt", "import_llama", "import_gpt_neox", "import_bloom",
    "track_tensorboard", "track_wandb", "track_mlflow",
    "optim_adamw", "optim_muon", "optim_lion", "optim_sgd",
    "schedule_cosine", "schedule_wsd", "schedule_linear", "schedule_constant",
    "eval_hellaswag",
)
