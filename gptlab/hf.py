"""Load Hugging Face GPT-2 checkpoints into a ``GPTModel``.

Three things differ between the two layouts: parameter names (``h.3.attn.c_attn`` here is
``blocks.3.attn.qkv``), weight orientation (HF GPT-2 uses Conv1D, stored (in, out), where
nn.Linear stores (out, in)), and a handful of HF config switches gptlab has no equivalent for.
Those switches are refused rather than ignored, and every tensor is accounted for in both
directions, so a checkpoint either loads exactly or fails with the key named.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import ConfigError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"

# Values transformers' GPT2Config assumes for keys a config.json leaves out; using the same ones
# means a sparse config.json gives the model transformers itself would build from it.
_HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1,
                "layer_norm_epsilon": 1e-5}

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

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
# Attention-mask buffers older checkpoints carry; gptlab builds its masks on the fly.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def load_hf_gpt2(cls: type, path: str | Path, plugins: Optional[Any] = None):
    """Build ``cls`` (a GPTModel) from an HF GPT-2 directory and copy its weights in.

    The model's train/eval mode is left as ``cls`` constructs it; callers pick the mode.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory; expected a Hugging Face GPT-2 checkpoint "
                          f"directory with {CONFIG_FILE} and {SAFETENSORS_FILE}")
    hf_cfg = read_hf_config(directory)
    cfg = config_from_hf(hf_cfg, directory / CONFIG_FILE)
    tensors, source = read_hf_weights(directory)
    try:
        model = cls(cfg, plugins=plugins)
    except ConfigError as exc:
        raise ConfigError(f"{directory / CONFIG_FILE} gives a config gptlab rejects: {exc}") from None
    copy_hf_weights(model, tensors, source, cfg["n_layers"])
    return model


def read_hf_config(directory: Path) -> dict:
    """config.json as a dict, with a one-line error when it is missing or not JSON."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{directory}: no {CONFIG_FILE}; expected a Hugging Face GPT-2 checkpoint "
                          f"directory with {CONFIG_FILE} and {SAFETENSORS_FILE} (or {PICKLE_FILE})")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_hf(hf: dict, source: str | Path = CONFIG_FILE) -> dict:
    """Translate an HF GPT-2 config dict into a gptlab model config dict.

    ``source`` only labels error messages. Settings gptlab cannot express raise ConfigError
    naming the key, since loading anyway would give a model that computes something else.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConfigError(f"{source}: model_type is {model_type!r}; only 'gpt2' checkpoints can be loaded")

    def get(key: str) -> Any:
        return hf.get(key, _HF_DEFAULTS.get(key))

    def integer(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
        return value

    for key, (ok, why) in _FIXED.items():
        if key in hf and hf[key] != ok:
            raise ConfigError(f"{source}: {key}={json.dumps(hf[key])} is not supported ({why})")

    act = get("activation_function")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: activation_function {act!r} is not supported; "
                          f"expected one of {', '.join(sorted(_ACTIVATIONS))}")
    # Old configs carry n_ctx beside n_positions; n_positions sizes the position table.
    ctx_key = "n_positions" if "n_positions" in hf or "n_ctx" not in hf else "n_ctx"
    eps = get("layer_norm_epsilon")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ConfigError(f"{source}: layer_norm_epsilon must be a positive number, got {eps!r}")
    drop = get("resid_pdrop")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)):
        raise ConfigError(f"{source}: resid_pdrop must be a number, got {drop!r}")

    cfg: dict[str, Any] = {
        "vocab_size": integer("vocab_size", get("vocab_size")),
        "context_length": integer(ctx_key, get(ctx_key)),
        "emb_dim": integer("n_embd", get("n_embd")),
        "n_heads": integer("n_head", get("n_head")),
        "n_layers": integer("n_layer", get("n_layer")),
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
        cfg["ff_dim"] = integer("n_inner", n_inner)
    return cfg


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors and the file they came from (for error messages).

    Prefers safetensors; falls back to pytorch_model.bin, read with ``weights_only=True`` so a
    checkpoint can never run code while it is unpickled.
    """
    single, index, pickled = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX, directory / PICKLE_FILE
    if single.is_file():
        return _load_safetensors(single), single
    if index.is_file():
        return _load_sharded(index), index
    if pickled.is_file():
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False, which is exactly what must not happen
            raise ConfigError(f"{pickled}: not a plain tensor state dict (corrupt, or it pickles other objects, "
                              f"which are never unpickled since they could run code); "
                              f"convert it to {SAFETENSORS_FILE}") from None
        except (OSError, RuntimeError, EOFError) as exc:
            raise ConfigError(f"{pickled}: cannot load it as a tensor state dict ({type(exc).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"{pickled}: expected a state dict mapping names to tensors")
        return state, pickled
    raise ConfigError(f"{directory}: no weights; expected {SAFETENSORS_FILE} (or {PICKLE_FILE}) "
                      f"next to {CONFIG_FILE}")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{file}: cannot read it as safetensors ({exc})") from None


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Merge the shards a ``model.safetensors.index.json`` names (what save_pretrained writes
    for large models)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{index}: expected a JSON object with a 'weight_map' ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise ConfigError(f"{index}: names shard {name}, which is not in {index.parent}")
        tensors.update(_load_safetensors(shard))
    return tensors


def hf_to_gptlab_names(n_layers: int) -> dict[str, tuple[str, bool]]:
    """HF tensor name (without 'transformer.') -> (gptlab parameter name, needs transpose)."""
    names = dict(_TOP_KEYS)
    for i in range(n_layers):
        for hf_suffix, (ours, transpose) in _BLOCK_KEYS.items():
            names[f"h.{i}.{hf_suffix}"] = (f"blocks.{i}.{ours}", transpose)
    return names


def copy_hf_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path,
                    n_layers: int) -> None:
    """Copy every HF tensor into ``model``; fail on any missing, unexpected or misshapen key."""
    names = hf_to_gptlab_names(n_layers)
    params = dict(model.named_parameters())  # the tied head is listed once, as tok_emb.weight
    seen: dict[str, str] = {}  # stripped HF name -> name as stored
    lm_head = None
    for key, tensor in tensors.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name == "lm_head.weight":
            lm_head = (key, tensor)
            continue
        if name.startswith("h.") and name.endswith(_BUFFER_SUFFIXES) and name not in names:
            continue
        if name not in names:
            raise ConfigError(f"{source}: unexpected tensor '{key}' (not part of a GPT-2 with "
                              f"{n_layers} layers)")
        if name in seen:
            raise ConfigError(f"{source}: tensor '{name}' appears twice, as '{seen[name]}' and '{key}'")
        seen[name] = key
        target, transpose = names[name]
        if target not in params:
            raise ConfigError(f"the model built for {source} has no parameter '{target}' to take '{key}'; "
                              f"a plugin may have replaced a built-in GPT-2 component")
        value = tensor.t() if transpose else tensor
        param = params[target]
        if value.shape != param.shape:
            stored = tuple(tensor.shape)
            raise ConfigError(f"{source}: tensor '{key}' has shape {stored}, but '{target}' needs "
                              f"{tuple(param.shape)}{' (transposed from Conv1D)' if transpose else ''}")
        with torch.no_grad():
            param.copy_(value)
    missing = [name for name in names if name not in seen]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{source}: missing tensor {shown}")
    if lm_head is not None:
        key, tensor = lm_head
        wte = params["tok_emb.weight"]
        if tensor.shape != wte.shape or not torch.equal(tensor.to(wte.dtype), wte.detach()):
            raise ConfigError(f"{source}: '{key}' differs from the token embedding; only checkpoints with a "
                              f"tied output head can be loaded")
    assigned = {names[name][0] for name in seen}
    unassigned = sorted(set(params) - assigned)
    if unassigned:
        raise ConfigError(f"the model built for {source} has parameters no checkpoint tensor filled: "
                          f"{', '.join(unassigned)}; a plugin may have replaced a built-in GPT-2 component")
