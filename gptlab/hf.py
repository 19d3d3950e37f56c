"""Load Hugging Face checkpoints into a ``GPTModel``.

This module reads the files (config.json; model.safetensors, sharded or not; a pickle only with
``weights_only=True``) and copies tensors with full accounting: every checkpoint tensor lands in
a parameter and every parameter is filled, or the load fails naming the key. What a family's
names and config keys mean is an *importer* plugin's business (``plugins/import_gpt2.py``),
registered under the HF ``model_type`` it reads.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"

@dataclass
class HFImport:
    """What an importer returns: the gptlab model config and where each checkpoint tensor goes."""

    config: dict  #: gptlab model config keys
    #: checkpoint tensor name (without ``prefix``) -> (gptlab parameter name, stored transposed)
    tensors: dict
    prefix: str = ""  #: a prefix checkpoints may put before every name (``transformer.``)
    #: name endings of buffers some checkpoints carry and gptlab rebuilds itself (attention masks)
    ignore_suffixes: tuple = ()
    #: name of an output head that must equal the token embedding (the model's head is tied)
    tied_head: Optional[str] = None
    tied_to: str = "tok_emb.weight"
    extra: dict = field(default_factory=dict)


def load_hf(cls: type, path: str | Path, plugins: Optional[Any] = None, expect: Optional[str] = None):
    """Build ``cls`` (a GPTModel) from a Hugging Face checkpoint directory and copy its weights in.

    The importer is the one registered under config.json's ``model_type`` (``expect`` when the
    file has none, and the only one accepted when given). The model's train/eval mode is left
    as ``cls`` constructs it; callers pick the mode.
    """
    from .plugin_manager import default_plugins

    plugins = plugins or default_plugins()
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory; expected a Hugging Face checkpoint "
                          f"directory with {CONFIG_FILE} and {SAFETENSORS_FILE}")
    hf_cfg = read_hf_config(directory)
    source = directory / CONFIG_FILE
    model_type = hf_cfg.get("model_type", expect)
    if expect is not None and model_type != expect:
        raise ConfigError(f"{source}: model_type is {model_type!r}; only '{expect}' checkpoints can be loaded here")
    known = plugins.registry.names("importer")
    if model_type not in known:
        raise ConfigError(f"{source}: no importer for model_type {model_type!r}; importers: {', '.join(known)}")
    entry = plugins.registry.lookup("importer", model_type, {})
    spec = entry.factory(hf_cfg, str(source))
    tensors, weights = read_hf_weights(directory)
    try:
        model = cls(spec.config, plugins=plugins)
    except ConfigError as exc:
        raise ConfigError(f"{source} gives a config gptlab rejects: {exc}") from None
    copy_hf_weights(model, tensors, weights, spec)
    return model


def read_hf_config(directory: Path) -> dict:
    """config.json as a dict, with a one-line error when it is missing or not JSON."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{directory}: no {CONFIG_FILE}; expected a Hugging Face checkpoint "
                          f"directory with {CONFIG_FILE} and {SAFETENSORS_FILE} (or {PICKLE_FILE})")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_hf_weights(directory: Path) -> tuple[dict, Path]:
    """The checkpoint's tensors and the file they came from (for error messages).

    Prefers safetensors; falls back to pytorch_model.bin, read with ``weights_only=True`` so a
    checkpoint can never run code while it is unpickled.
    """
    import torch

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


def _load_safetensors(file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{file}: cannot read it as safetensors ({exc})") from None


def _load_sharded(index: Path) -> dict:
    """Merge the shards a ``model.safetensors.index.json`` names (what save_pretrained writes
    for large models)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{index}: expected a JSON object with a 'weight_map' ({exc})") from None
    tensors: dict = {}
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise ConfigError(f"{index}: names shard {name}, which is not in {index.parent}")
        tensors.update(_load_safetensors(shard))
    return tensors


def copy_hf_weights(model: Any, tensors: dict, source: Path, spec: HFImport) -> None:
    """Copy every checkpoint tensor into ``model``; fail on any missing, unexpected or misshapen key."""
    import torch

    names = spec.tensors
    params = dict(model.named_parameters())  # a tied head is listed once, under the embedding's name
    seen: dict[str, str] = {}  # name without prefix -> name as stored
    head = None
    for key, tensor in tensors.items():
        name = key[len(spec.prefix):] if spec.prefix and key.startswith(spec.prefix) else key
        if spec.tied_head is not None and name == spec.tied_head:
            head = (key, tensor)
            continue
        if name not in names and spec.ignore_suffixes and name.endswith(tuple(spec.ignore_suffixes)):
            continue
        if name not in names:
            raise ConfigError(f"{source}: unexpected tensor '{key}' (not part of the model its config describes)")
        if name in seen:
            raise ConfigError(f"{source}: tensor '{name}' appears twice, as '{seen[name]}' and '{key}'")
        seen[name] = key
        target, transpose = names[name]
        if target not in params:
            raise ConfigError(f"the model built for {source} has no parameter '{target}' to take '{key}'; "
                              f"a plugin may have replaced a component the importer maps")
        value = tensor.t() if transpose else tensor
        param = params[target]
        if value.shape != param.shape:
            raise ConfigError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, but '{target}' needs "
                              f"{tuple(param.shape)}{' (stored transposed)' if transpose else ''}")
        with torch.no_grad():
            param.copy_(value)
    missing = [name for name in names if name not in seen]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{source}: missing tensor {shown}")
    if head is not None:
        key, tensor = head
        emb = params[spec.tied_to]
        if tensor.shape != emb.shape or not torch.equal(tensor.to(emb.dtype), emb.detach()):
            raise ConfigError(f"{source}: '{key}' differs from the token embedding; only checkpoints with a "
                              f"tied output head can be loaded")
    unassigned = sorted(set(params) - {names[name][0] for name in seen})
    if unassigned:
        raise ConfigError(f"the model built for {source} has parameters no checkpoint tensor filled: "
                          f"{', '.join(unassigned)}; a plugin may have replaced a component the importer maps")
