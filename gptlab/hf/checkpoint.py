"""Load Hugging Face checkpoints into a ``GPTModel``, and write one back out.

This module reads the files (config.json; model.safetensors, sharded or not; a pickle only with
``weights_only=True``) and copies tensors with full accounting: every checkpoint tensor lands in
a parameter and every parameter is filled, or the load fails naming the key. What a family's
names and config keys mean is an *importer* plugin's business (``plugins/import_gpt2.py``),
registered under the HF ``model_type`` it reads; its ``to_hf`` attribute, when it has one,
lets ``export_hf`` write a model of that family with the same map.
"""
from __future__ import annotations

import json
import numbers
import pickle
import stat
import warnings
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, one_line
from ..plugin.contract import HFImport, fused_rows, per_head_rows  # the contract's; re-exported here
from ..plugin.hookspecs import KINDS, MODEL_KINDS

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
#: the largest config.json read (a real one is a few kB) and the largest shard index (one line a tensor)
MAX_CONFIG_BYTES = 4 * 2 ** 20
MAX_INDEX_BYTES = 64 * 2 ** 20


def load_hf(cls: type, path: str | Path, plugins: Optional[Any] = None, expect: Optional[str] = None):
    """Build ``cls`` (a GPTModel) from a Hugging Face checkpoint directory and copy its weights in.

    The importer is the one registered under config.json's ``model_type`` (``expect`` when the
    file has none, and the only one accepted when given). The model's train/eval mode is left
    as ``cls`` constructs it; callers pick the mode.
    """
    from ..plugin.manager import default_plugins

    plugins = plugins or default_plugins()
    spec, source = import_spec(path, plugins, expect)
    try:
        model = cls(spec.config, plugins=plugins)
    except ConfigError as exc:
        raise ConfigError(f"{source} gives a config gptlab rejects: {exc}") from None
    tensors, weights = read_hf_weights(Path(path))
    copy_hf_weights(model, tensors, weights, spec)
    return model


def import_spec(path: str | Path, plugins: Any, expect: Optional[str] = None) -> tuple[HFImport, Path]:
    """The importer's reading of a checkpoint directory's config.json (no weights read)."""
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
    return entry.factory(hf_cfg, str(source)), source


def hf_model_config(path: str | Path, plugins: Optional[Any] = None) -> dict:
    """The gptlab model config a checkpoint directory describes (``model: {from_hf: DIR}``)."""
    from ..plugin.manager import default_plugins

    return dict(import_spec(path, plugins or default_plugins())[0].config)


def load_hf_weights(model: Any, path: str | Path, plugins: Any, shapes_only: bool = False) -> None:
    """Fill ``model`` (built from any config, e.g. one a variant changed) with a checkpoint's weights,
    failing on any tensor without a place or parameter left unfilled. ``shapes_only`` reads only
    the tensor headers and copies nothing (the dry run's check, on a model built on the meta device)."""
    spec, _ = import_spec(path, plugins)
    tensors, weights = read_hf_weights(Path(path), shapes_only=shapes_only)
    copy_hf_weights(model, tensors, weights, spec)


def read_hf_config(directory: Path) -> dict:
    """config.json as a dict, with a one-line error when it is missing, not a regular file, larger
    than ``MAX_CONFIG_BYTES``, not JSON or not a JSON object."""
    file = directory / CONFIG_FILE
    if not file.exists() and not file.is_symlink():
        raise ConfigError(f"{directory}: no {CONFIG_FILE}; expected a Hugging Face checkpoint "
                          f"directory with {CONFIG_FILE} and {SAFETENSORS_FILE} (or {PICKLE_FILE})")
    data = read_json_bounded(file, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {_json_kind(data)}")
    return data


def read_json_bounded(file: Path, limit: int) -> Any:
    """A JSON file's contents, refused in one line naming ``file`` when it is not a regular file
    (a link to /dev/zero, a fifo), is larger than ``limit`` bytes, or does not parse (bad text,
    nesting deeper than Python can follow, an integer of more digits than Python converts)."""
    try:
        if not stat.S_ISREG(file.stat().st_mode):  # before opening: a fifo would block the open itself
            raise ConfigError(f"{file}: not a regular file; expected a JSON file")
        with open(file, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > limit:
        raise ConfigError(f"{file}: larger than the {limit // 2 ** 20} MiB gptlab reads of it; "
                          f"a Hugging Face {file.name} is far smaller")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = one_line(exc, 120) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise ConfigError(f"{file}: cannot read it as JSON ({detail})") from None


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_hf_weights(directory: Path, shapes_only: bool = False) -> tuple[dict, Path]:
    """The checkpoint's tensors and the file they came from (for error messages).

    Prefers safetensors; falls back to pytorch_model.bin, read with ``weights_only=True`` so a
    checkpoint can never run code while it is unpickled. ``shapes_only``: safetensors files give
    meta tensors of the stored shapes, read from their headers.
    """
    import torch

    single, index, pickled = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX, directory / PICKLE_FILE
    if single.is_file():
        return _load_safetensors(single, shapes_only), single
    if index.is_file():
        return _load_sharded(index, shapes_only), index
    if pickled.is_file():
        try:
            with warnings.catch_warnings():  # torch warns (protocol, TorchScript) before refusing: one line only
                warnings.simplefilter("ignore")
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


def _load_safetensors(file: Path, shapes_only: bool = False) -> dict:
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if shapes_only:
            with safe_open(str(file), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        return load_file(str(file), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{file}: cannot read it as safetensors ({exc})") from None


def _load_sharded(index: Path, shapes_only: bool = False) -> dict:
    """Merge the shards a ``model.safetensors.index.json`` names (what save_pretrained writes
    for large models)."""
    data = read_json_bounded(index, MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index}: expected a JSON object with a 'weight_map' of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    tensors: dict = {}
    for name in shards:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ConfigError(f"{index}: names shard {name[:80]!r}, which is not a file name in {index.parent}")
        shard = index.parent / name
        if not shard.is_file():
            raise ConfigError(f"{index}: names shard {name}, which is not in {index.parent}")
        tensors.update(_load_safetensors(shard, shapes_only))
    return tensors


#: the skeleton's parameters with one row per vocabulary entry (padded by ``model.vocab_multiple``)
VOCAB_ROWS = ("tok_emb.weight", "head.weight")


def unpadded(model: Any, name: str, value: Any) -> Any:
    """``value`` (parameter ``name`` of ``model``) without the rows ``vocab_multiple`` padding added."""
    if name in VOCAB_ROWS and value.shape[0] != model.config.vocab_size:
        return value[:model.config.vocab_size]
    return value


def copy_hf_weights(model: Any, tensors: dict, source: Path, spec: HFImport) -> None:
    """Copy every checkpoint tensor into ``model``; fail on any missing, unexpected or misshapen key,
    and on a parameter (or part of one) that no tensor filled. A vocabulary padded by
    ``vocab_multiple`` takes the checkpoint's rows first; its padding rows are zeros."""
    import torch

    slots = {name: (target, transpose, rows) for name, target, transpose, rows in spec.slots()}
    params = dict(model.named_parameters())  # a tied head is listed once, under the embedding's name
    filled = {}  # target -> rows filled so far (a bool per row)
    seen: dict[str, str] = {}  # name without prefix -> name as stored
    head = None
    for key, tensor in tensors.items():
        name = key[len(spec.prefix):] if spec.prefix and key.startswith(spec.prefix) else key
        if spec.tied_head is not None and name == spec.tied_head:
            head = (key, tensor)
            continue
        if name not in slots and spec.ignore_suffixes and name.endswith(tuple(spec.ignore_suffixes)):
            continue
        if name not in slots:
            raise ConfigError(f"{source}: unexpected tensor '{key}' (not part of the model its config describes)")
        if name in seen:
            raise ConfigError(f"{source}: tensor '{name}' appears twice, as '{seen[name]}' and '{key}'")
        seen[name] = key
        target, transpose, rows = slots[name]
        if target not in params:
            raise ConfigError(f"the model built for {source} has no parameter '{target}' to take '{key}'; "
                              f"a plugin may have replaced a component the importer maps")
        value = tensor.t() if transpose else tensor
        param = params[target]
        if rows is None and target in VOCAB_ROWS and param.shape[0] > model.config.vocab_size:
            with torch.no_grad():
                param[model.config.vocab_size:] = 0  # padding: never an input, never predicted
            done = filled.setdefault(target, torch.zeros(param.shape[0], dtype=torch.bool))
            done[model.config.vocab_size:] = True
            rows = list(range(model.config.vocab_size))
        want = param.shape if rows is None else (len(rows), *param.shape[1:])
        if value.shape != want or (rows is not None and max(rows, default=-1) >= param.shape[0]):
            if rows is not None:
                raise ConfigError(f"{source}: tensor '{key}' {tuple(tensor.shape)} goes to rows {min(rows)}..{max(rows)} "
                                  f"of '{target}', whose shape is {tuple(param.shape)}")
            raise ConfigError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, but '{target}' needs "
                              f"{tuple(want)}{' (stored transposed)' if transpose else ''}")
        done = filled.setdefault(target, torch.zeros(param.shape[0], dtype=torch.bool))
        index = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if done[index].any():
            raise ConfigError(f"{source}: '{key}' fills rows of '{target}' another tensor already filled")
        done[index] = True
        with torch.no_grad():
            param[index] = value.to(param.dtype)
    _check_complete(model, source, spec, slots, seen, head, params, filled)


def _check_complete(model: Any, source: Path, spec: HFImport, slots: dict, seen: dict, head: Any, params: dict,
                    filled: dict) -> None:
    """After the copy: every slot had its tensor, a tied head equals the embedding, and every
    parameter row was filled."""
    import torch

    missing = [name for name in slots if name not in seen]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{source}: missing tensor {shown}")
    if head is not None:
        key, tensor = head
        emb = unpadded(model, spec.tied_to, params[spec.tied_to])
        values_differ = not (tensor.is_meta or emb.is_meta) and not torch.equal(tensor.to(emb.dtype), emb.detach())
        if tensor.shape != emb.shape or values_differ:
            raise ConfigError(f"{source}: '{key}' differs from the token embedding; only checkpoints with a "
                              f"tied output head can be loaded")
    unassigned = sorted(name for name in params if name not in filled or not bool(filled[name].all()))
    if unassigned:
        raise ConfigError(f"the model built for {source} has parameters no checkpoint tensor filled: "
                          f"{', '.join(unassigned)}; a plugin may have replaced a component the importer maps")


# ---------------------------------------------------------------------------------------------
# Export: the importer's map run backwards
# ---------------------------------------------------------------------------------------------
def export_hf(model: Any, out_dir: str | Path, plugins: Optional[Any] = None, tokenizer: Any = None) -> str:
    """Write ``model`` as a Hugging Face checkpoint directory (config.json + model.safetensors).

    The family is the first importer whose ``to_hf(config)`` accepts the model's config. The
    config it writes is read back through that importer and must build the same model (a bias
    the family has and the model lacks is written as zeros, which computes the same), so a
    lossy mapping is refused rather than written. Special token ids are written as
    ``special_token_ids`` says (``tokenizer``: the run's, when known). Returns the model_type written.
    """
    import torch
    from safetensors.torch import save_file

    from ..plugin.manager import default_plugins

    plugins = plugins or default_plugins()
    _refuse_layout(model.config)
    cfg = model.config.to_dict()
    reasons = []
    for family in plugins.registry.names("importer"):
        factory = plugins.registry.lookup("importer", family, {}).factory
        to_hf = KINDS["importer"].attr(factory, "to_hf")
        if to_hf is None:
            continue
        try:
            hf_config = to_hf(cfg)
            hf_config = {**hf_config, **special_token_ids(hf_config, tokenizer)}
            spec = factory(hf_config, f"the config exported as {family}")
            zero = _check_round_trip(model, spec.config, family, plugins)
        except ConfigError as exc:
            reasons.append(f"{family}: {exc}")
            continue
        break
    else:
        raise ConfigError("this model maps to no Hugging Face family: " + "; ".join(reasons or ["no importer exports"]))
    params = dict(model.named_parameters())
    tensors = {}
    for name, target, transpose, rows in spec.slots():
        # a bias the family has and this model does not is zero, which computes the same
        value = torch.zeros(zero[target]) if target in zero else unpadded(model, target, params[target].detach())
        if rows is not None:
            value = value[torch.as_tensor(rows, dtype=torch.long)]
        if transpose:
            value = value.t()
        tensors[spec.stored_name(name)] = value.to("cpu", torch.float32).contiguous().clone()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, config = out / f".{SAFETENSORS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config.write_text(json.dumps({**hf_config, "torch_dtype": "float32"}, indent=2) + "\n")
    weights.replace(out / SAFETENSORS_FILE)  # the weights first: a config.json means the pair is complete
    config.replace(out / CONFIG_FILE)
    return family


#: the end-of-text token's text in gptlab's tokenizers ('char') and in GPT-2's vocabulary
END_OF_TEXT = "<|endoftext|>"
#: the special token ids an export decides: the start and the end of a text
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id")


def end_of_text_id(tokenizer: Any) -> Optional[int]:
    """The id of ``tokenizer``'s end-of-text token, or None when it has none.

    The tokenizer's own ``eot_id`` when set (documents corpora: bytes' 256, bpe's special); else
    one when ``END_OF_TEXT`` encodes to a single id that decodes back to it (the 'char'
    tokenizer's special; 'bytes' spells it in 13 bytes: none), or when it wraps a tiktoken
    encoding, whose ``eot_token`` is it ('tiktoken': 50256 for gpt2)."""
    own = _token_id(getattr(tokenizer, "eot_id", None))
    if own is not None:
        return own
    try:
        ids = list(tokenizer.encode(END_OF_TEXT))
        if len(ids) == 1 and tokenizer.decode(ids) == END_OF_TEXT:
            return _token_id(ids[0])
    except Exception:  # a tokenizer plugin that cannot encode it has no such token
        pass
    return _token_id(getattr(getattr(tokenizer, "enc", None), "eot_token", None))


def _token_id(value: Any) -> Optional[int]:
    """``value`` as a token id (an integer, numpy's too, never a bool), or None."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def special_token_ids(hf_config: dict, tokenizer: Any = None) -> dict:
    """The special token ids to write into an exported config.json: each an id inside its
    ``vocab_size``, or null, never one transformers would warn about.

    With the run's ``tokenizer``: its end-of-text token (``end_of_text_id``) is both bos and eos;
    without one, both are null. Without a tokenizer: the ids ``to_hf`` wrote (GPT-2 writes its
    <|endoftext|>, 50256), each kept only inside the vocabulary; a key ``to_hf`` left out stays out
    (the loader's own default applies, which the export cannot check). Any other ``*_token_id``
    ``to_hf`` wrote outside the vocabulary becomes null too.
    """
    vocab = hf_config.get("vocab_size")

    def inside(value: Any) -> Optional[int]:
        token = _token_id(value)
        return token if token is not None and isinstance(vocab, int) and 0 <= token < vocab else None

    if tokenizer is not None:
        eot = inside(end_of_text_id(tokenizer))
        out = {key: eot for key in SPECIAL_TOKENS}
    else:
        out = {key: inside(hf_config[key]) for key in SPECIAL_TOKENS if key in hf_config}
    for key, value in hf_config.items():
        if key.endswith("_token_id") and key not in out and value is not None and inside(value) is None:
            out[key] = None
    return out


#: keys that may differ between a model and its export: dropout and checkpointing (training only),
def _refuse_layout(config: Any) -> None:
    """A per-layer layout fits no Hugging Face family gptlab exports (each has one set of
    components for every layer): refuse it naming the first layer and component that differ."""
    if not config.layers:
        return
    for i, layer in enumerate(config.layer_specs()):
        for kind, spec in layer.items():
            if spec != getattr(config, kind):
                raise ConfigError(f"model.layers: layer {i} has {kind} {spec.to_plain()!r} where the model has "
                                  f"{getattr(config, kind).to_plain()!r}; no Hugging Face family gptlab exports "
                                  f"holds a {kind} per layer (export a model without model.layers)")


#: the weights it started from, the MLP width (compared by parameter shape), the bias switches
#: (compared parameter by parameter), the vocabulary padding (its rows are not exported) and the
#: z-loss (a training term: the exported model computes the same logits)
_EXPORT_FREE = {"drop_rate", "gradient_checkpointing", "from_hf", "bias", "qkv_bias", "attn_out_bias", "mlp_bias",
                "norm_bias", "ff_dim", "activation", "vocab_multiple", "z_loss"}


def _check_round_trip(model: Any, exported: dict, family: str, plugins: Any) -> dict:
    """Refuse an export whose config, read back by the family's importer, builds another model.

    Compares the configs (component options at their defaults ignored) and the parameters of
    both models; returns the parameters the export has and ``model`` lacks, all biases that are
    written as zeros, mapped to their shapes.
    """
    import torch

    from ..config.model import ModelConfig

    own, back = ModelConfig.from_any(model.config), ModelConfig.from_any(exported)
    mine, theirs_cfg = _normal(own, plugins), _normal(back, plugins)
    for kind in MODEL_KINDS:
        (name, _), (other, options) = mine[kind], theirs_cfg[kind]
        if name != other and _computes(plugins, kind, name) is not None \
                and _computes(plugins, kind, name) == _computes(plugins, kind, other):
            theirs_cfg[kind] = (name, options)  # one function, another kernel: the options still count
        if theirs_cfg[kind][0] != name:
            raise ConfigError(f"{kind} '{name}': a {family} checkpoint holds '{other}'")
    differ = [k for k, v in mine.items() if k not in _EXPORT_FREE and theirs_cfg[k] != v]
    if differ:
        raise ConfigError(f"exporting as {family} would change model.{differ[0]} "
                          f"({getattr(own, differ[0])!r} -> {getattr(back, differ[0])!r})")
    with torch.device("meta"):
        twin = type(model)(back, plugins=plugins)
    ours = {n: tuple(unpadded(model, n, p).shape) for n, p in model.named_parameters()}  # padding rows stay home
    theirs = {n: tuple(p.shape) for n, p in twin.named_parameters()}
    for name, shape in ours.items():
        if theirs.get(name) != shape:
            raise ConfigError(f"parameter '{name}' {shape} has no place in a {family} checkpoint"
                              + (f" (it would be {theirs[name]})" if name in theirs else ""))
    extra = {n: s for n, s in theirs.items() if n not in ours}
    not_bias = [n for n in extra if not n.endswith(".bias")]
    if not_bias:
        raise ConfigError(f"a {family} checkpoint needs parameter '{not_bias[0]}', which this model lacks")
    return extra


def _computes(plugins: Any, kind: str, name: str) -> Any:
    """What a component declares it computes (``computes``), or None."""
    if "computes" not in KINDS[kind].attrs:
        return None
    return KINDS[kind].attr(plugins.registry.lookup(kind, name, {}).factory, "computes")


def _normal(cfg: Any, plugins: Any) -> dict:
    """A model config as plain data with every component written as (name, options) and the options
    left at their defaults dropped, so two spellings of one model compare equal."""
    import inspect

    out = cfg.to_dict()
    for kind in MODEL_KINDS:
        spec = getattr(cfg, kind)
        factory = plugins.registry.lookup(kind, spec.name, spec.options, cfg).factory
        defaults = {n: p.default for n, p in inspect.signature(factory).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        out[kind] = (spec.name, {k: v for k, v in spec.options.items() if defaults.get(k, object()) != v})
    return out

