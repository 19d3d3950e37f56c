"""The plugin contract in one module: for every kind of component, the class or ``typing.Protocol``
its factory's result satisfies (``KINDS[kind].base``), what a plugin of that kind receives and the
helpers it may call (``HELPERS``), and the parameter names components declare for importers.

Every public name here is also ``gptlab.<name>``; a plugin imports from ``gptlab``. The hooks and
how each kind's factory is called are in ``gptlab.plugin.hookspecs`` (``KINDS``, re-exported here).

========================  ====================  ============================================
kind                      base                  what it is
========================  ====================  ============================================
attention                 CausalSelfAttention   class to subclass: write ``attend(q, k, v, ctx)``
position                  PositionScheme        class to subclass: ``embed``, ``context``
norm                      Norm                  protocol: a module over the last dimension
norm_placement            Block                 protocol: ``(x, ctx, cache) -> x``, ``final_norm``
activation                FeedForward           protocol: ``x -> x``; ``MLP``, ``GatedMLP`` build one
wiring                    Wiring                class to subclass: ``forward(x, x0, run, n_layers)``
dataset                   Corpus                dataclass: ``fingerprint``, ``documents()``
tokenizer                 Tokenizer             class to subclass: ``encode``, ``decode``
importer                  HFImport              dataclass: model config + tensor name map
optimizer                 Optimizer             ``torch.optim.Optimizer`` over ``ParamInfo`` s
schedule                  Schedule              class to subclass: ``multiplier(step, group)``
tracker                   Tracker               protocol of the factory: ``() -> None``
eval                      Eval                  class to subclass: ``(model, tokenizer, device, autocast) -> metrics``
========================  ====================  ============================================

Parameter names. An importer maps checkpoint tensors onto gptlab parameter names such as
``blocks.3.attn.qkv.weight``. Each part of such a name is declared by the part of the model that
owns it: the skeleton's own (``SKELETON``: ``tok_emb``, ``position``, ``embedding_norm``,
``blocks``, ``final_norm``, ``head``), then each component's ``param_names``, a mapping role ->
attribute name (dotted, relative to the component): a block declares the roles ``attn`` and
``mlp`` (its sublayers) and its norms (``norm1``, ``norm2``, ...), an attention ``qkv`` and
``out_proj``, an MLP ``fc`` and ``proj``, the learned position ``emb``. Every declared module
holds its parameters as ``weight`` and, when it has one, ``bias`` (as torch's Linear, Embedding
and norms do). ``declared_modules(model)`` lists them for a built model; a component that renames
an attribute updates its ``param_names``, and ``tests/plugin/test_contract.py`` fails when a declared
name is missing from a built model or an importer writes a name no component declares.

Layering: ``gptlab.plugin`` imports only ``gptlab.errors``, ``fmt``, ``rundir`` and itself, so the
base classes with no torch in them (``Corpus``, ``Tokenizer``, ``HFImport``) live here and
``gptlab.data.text`` and ``gptlab.hf.checkpoint`` re-export them; helpers that live in higher
layers (``HFConfig``, the tracking helpers) are named in ``HELPERS`` by dotted path. Nothing here
imports torch: the torch-backed bases load on first access. ``python -m gptlab.plugin.contract``
rewrites the README's table of kinds from ``KINDS``.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Protocol, runtime_checkable

from ..errors import ConfigError
from .hookspecs import KINDS, MODEL_KINDS, Attr, Kind, Range, RunInfo, hookimpl

if TYPE_CHECKING:  # annotations only: nothing here imports torch
    import torch

    from .components import KVCache, PositionalContext

#: torch-backed bases and values, loaded on first access: name -> module of gptlab.plugin
_TORCH_BACKED = {
    "CausalSelfAttention": "layers", "FlexAttention": "layers", "MLP": "layers", "GatedMLP": "layers",
    "PositionScheme": "components", "PositionalContext": "components", "KVCache": "components",
    "Wiring": "components",
    "mark_residual": "components", "aux_loss": "components", "aux_metric": "components",
}


def __getattr__(name: str) -> Any:
    if name == "Optimizer":  # the optimizer kind's base is torch's own
        from torch.optim import Optimizer

        globals()[name] = Optimizer
        return Optimizer
    if name not in _TORCH_BACKED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _TORCH_BACKED[name] == "layers":
        from . import layers as module
    else:
        from . import components as module
    value = getattr(module, name)
    globals()[name] = value
    return value


# ---------------------------------------------------------------------------------------------
# Protocols: the kinds with no base class
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class Norm(Protocol):
    """What a norm factory returns: ``factory(cfg, dim, **options)`` -> a module that normalises the
    last dimension (``dim`` wide) of its input and keeps the shape. Its parameters are named
    ``weight`` (the gain) and ``bias`` (when it has one), as ``torch.nn.LayerNorm`` and
    ``RMSNorm`` name them: importers write ``norm1.weight``."""

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor": ...


@runtime_checkable
class Block(Protocol):
    """What a norm_placement factory returns: ``factory(cfg, attention=..., mlp=..., norm=..., **options)``
    -> one transformer block. ``attention()`` and ``mlp()`` build one sublayer each and ``norm(dim)``
    one norm; the block owns the residual wiring and the dropout.

    ``final_norm`` (a class attribute, default True): whether the model needs a norm before the
    head. ``param_names``: role -> attribute name; ``attn`` and ``mlp`` name the sublayers (their own
    ``param_names`` continue the name), every other role a norm: ``norm1`` the attention half's,
    ``norm2`` the MLP half's, ``norm`` one both share, ``norm1_in``/``norm1_out`` (and ``norm2_*``)
    the norms before and after a sublayer.
    """

    def __call__(self, x: "torch.Tensor", ctx: "PositionalContext",
                 cache: "Optional[KVCache]" = None) -> "torch.Tensor": ...


@runtime_checkable
class FeedForward(Protocol):
    """What an activation factory returns: ``factory(cfg, **options)`` -> the feed-forward module
    ``x (B, T, C) -> (B, T, C)``. ``gptlab.MLP.factory(act, doc)`` and ``GatedMLP.factory`` make
    one from an activation function. Optional attributes: ``hidden_dim`` and ``gated`` (for the
    memory estimate), ``param_names`` (MLP and GatedMLP: ``fc``, rows [gate; up] when gated, and
    ``proj``)."""

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor": ...


@runtime_checkable
class Tracker(Protocol):
    """A tracker factory: ``factory()``, called once before anything trains (``--dry-run`` too). It
    writes nothing, returns nothing, and raises ``gptlab.ConfigError`` when the sink cannot work
    (its package missing: ``gptlab.require(module, extra, tracker)`` names the extra). The tracking
    itself is the plugin's lifecycle hooks, which receive a ``gptlab.RunInfo`` and are called only
    for runs where ``run.tracks(name)``."""

    def __call__(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Datasets and tokenizers (re-exported by gptlab.data.text). No torch: a tokenizer is plain Python.
# ---------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """A text source. ``fingerprint`` changes whenever the text would.

    Three ways to give the text, the first one set wins:
    - ``tokens``: ready token ids (files another tool wrote): a function returning the (train,
      validation) token sequences, each an array or a list of arrays (shards), read in place;
      gptlab neither reads text nor tokenizes, and the named tokenizer is the one they were made with.
    - ``documents``: a function returning an iterable of documents (str), read lazily, for corpora
      of any size. gptlab tokenizes them in chunks over worker processes into sharded token files,
      ends each document with the tokenizer's end-of-text id, and holds out a stable fraction of
      documents for validation, chosen by a hash of each document's text. A source with its own
      split sets ``val_documents`` too: then ``documents`` are the training documents.
    - ``read``: the whole text as one string, tokenized whole, the validation split its tail: the
      way gptlab read every corpus before documents existed (existing experiments keep their tokens).
    """

    fingerprint: str
    read: Optional[Callable[[], str]] = None
    tokens: Optional[Callable[[], tuple]] = None
    documents: Optional[Callable[[], Iterable[str]]] = None
    val_documents: Optional[Callable[[], Iterable[str]]] = None


class Tokenizer:
    """Base class for tokenizers; ``fit`` and the state methods are no-ops for fixed vocabularies."""

    vocab_size: int = 0
    #: the id that ends each document of a documents corpus; None until the tokenizer has one
    eot_id: Optional[int] = None

    def fit(self, text: str) -> None:
        """Build a vocabulary from the training text (only data-dependent tokenizers need it)."""

    def fit_documents(self, documents: Iterable[str]) -> None:
        """Build a vocabulary from a stream of training documents (a documents corpus). The default
        joins them and calls ``fit``; a tokenizer that can learn from a stream overrides it, so the
        corpus is never held whole."""
        self.fit("".join(documents))

    def add_eot(self) -> None:
        """Give the vocabulary an end-of-text id (set ``eot_id``, grow ``vocab_size``): called after
        ``fit`` when a documents corpus meets a tokenizer whose ``eot_id`` is None. The default
        refuses, since documents could not be told apart."""
        raise ConfigError(f"tokenizer {type(self).__name__} has no end-of-text id to separate documents; "
                          f"use one that has (bytes, tiktoken, bpe) or define add_eot")

    def encode(self, text: str) -> list[int]:
        """Text -> token ids: every tokenizer plugin writes this."""
        raise NotImplementedError(f"tokenizer {type(self).__name__} must define encode(text)")

    def encode_batch(self, texts: list) -> list:
        """Many texts at once, as the preparation workers call it: one id sequence (a list or an
        integer numpy array) per text. Override it when there is a faster path than a loop."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text: every tokenizer plugin writes this."""
        raise NotImplementedError(f"tokenizer {type(self).__name__} must define decode(ids)")

    def token_bytes(self, ids: "list[int]") -> "list[int]":
        """UTF-8 bytes of the text each token id stands for (bits per byte divide by them). The
        default decodes each id alone; a tokenizer whose tokens are pieces of characters (bytes,
        byte-level BPE) overrides it."""
        return [len(self.decode([i]).encode("utf-8")) for i in ids]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``fit`` (and ``add_eot``) learned."""


#: the folder of the experiment file whose dataset is being built (set by the core around a
#: dataset factory's call; None outside one, or for a config given without a file)
EXPERIMENT_DIR: ContextVar[Optional[Path]] = ContextVar("gptlab_experiment_dir", default=None)


def data_path(path: str, key: str = "data.dataset.path") -> str:
    """A path a dataset option names, as its experiment means it: a relative path (or glob)
    starts at the experiment file's folder. One that matches nothing there but matches from the
    current directory (how gptlab read such paths before) still works, with a warning naming the
    new form. Returns the pattern to open or glob; absolute and ``~`` paths pass through."""
    text = os.path.expanduser(str(path))
    base = EXPERIMENT_DIR.get()
    if os.path.isabs(text) or base is None:
        return text
    there = str(base / text)
    if glob.glob(there, recursive=True) or not glob.glob(text, recursive=True):
        return there
    suggestion = os.path.relpath(os.path.abspath(text), base)
    sys.stderr.write(f"gptlab: warning: {key} '{path}' was found from the current directory; relative paths "
                     f"in an experiment start at its folder ({base}): write '{suggestion}' or an absolute path\n")
    return text


# ---------------------------------------------------------------------------------------------
# Downstream evaluations: the eval kind (``evals:`` of an experiment or a variant)
# ---------------------------------------------------------------------------------------------
class Eval:
    """Base class of the eval kind: ``factory(**options)`` -> an Eval, one per run that lists it.

    Why a kind of its own: a validation loss says how well a model predicts held-out text, not
    whether it can do a task; an eval measures the task (HellaSwag's multiple choice) on the very
    model the run trains, at the same steps, so its curve sits beside ``val_loss``.

    The factory is called before anything trains (preflight, and ``--dry-run``) and again when the
    run starts, with ``EXPERIMENT_DIR`` set to the experiment file's folder: open files through
    ``gptlab.data_path(path, key="evals.<name>.path")`` (relative paths start there) and raise ``gptlab.ConfigError``
    naming the key and the path when one is missing, so a bad path stops the command at once.

    ``__call__(model, tokenizer, device, autocast)`` -> ``{metric: number or None}``, called at
    every evaluation step (``train.eval_every`` and the last step; a run's final values are its
    last step's) on rank 0 only, so it must not use collectives. gptlab hands it the bare model
    (not DDP, not compiled) in eval mode under ``torch.no_grad()`` and restores training mode and
    the random streams after it; ``model(idx)`` gives logits (B, T, vocab), at most
    ``model.config.context_length`` tokens; ``autocast()`` is the run's precision context (bf16
    autocast on CUDA, nothing on CPU): run forwards inside it. ``tokenizer`` is the run's own
    (``gptlab.Tokenizer``). Return metric names without a prefix: gptlab writes each as
    ``<registered name>_<metric>`` (``hellaswag_acc``) in metrics.jsonl, summary.json, the tracking
    sinks and ``gptlab compare``, where a name ending in ``acc`` or ``accuracy`` counts as better
    when higher and any other as better when lower.
    """

    def __call__(self, model: Any, tokenizer: "Tokenizer", device: Any,
                 autocast: Callable[[], Any]) -> Mapping[str, Optional[float]]:
        raise NotImplementedError(f"eval {type(self).__name__} must define __call__(model, tokenizer, device, autocast)")


def file_stamp(files: list) -> str:
    """A dataset's fingerprint of its files: what changes when a file's contents may have
    (absolute path, size and modification time in ns)."""
    return ";".join(f"{os.path.abspath(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)


# ---------------------------------------------------------------------------------------------
# Importers (re-exported by gptlab.hf.checkpoint, which reads and writes the files)
# ---------------------------------------------------------------------------------------------
@dataclass
class HFImport:
    """What an importer returns: the gptlab model config and where each checkpoint tensor goes.

    ``tensors`` maps a checkpoint name (without ``prefix``) to ``(target, transpose)`` or
    ``(target, transpose, rows)``: the tensor, transposed if asked, fills ``target``'s rows
    ``rows`` (a list of row indices, in the tensor's order), or all of it when there are none.
    A target is a declared parameter name (``declared_modules`` above: ``blocks.3.attn.qkv.weight``).
    Rows let several checkpoint tensors share one gptlab parameter (Llama's q/k/v in ``attn.qkv``)
    and reorder an interleaved one (GPT-NeoX's per-head q/k/v). Every row of every target must be
    filled exactly once; exporting a model runs the same map backwards.
    """

    config: dict  #: gptlab model config keys
    tensors: dict  #: checkpoint tensor name (without ``prefix``) -> (target, transpose[, rows])
    prefix: str = ""  #: a prefix checkpoints may put before every name (``transformer.``)
    #: names stored without ``prefix`` even when the others carry it (an untied ``lm_head.weight``)
    outside_prefix: tuple = ()
    #: name endings of buffers some checkpoints carry and gptlab rebuilds itself (attention masks)
    ignore_suffixes: tuple = ()
    #: name of an output head that must equal the token embedding (the model's head is tied)
    tied_head: Optional[str] = None
    tied_to: str = "tok_emb.weight"
    extra: dict = field(default_factory=dict)

    def slots(self):
        """(checkpoint name, target, transpose, rows or None) for every mapped tensor."""
        for name, slot in self.tensors.items():
            target, transpose, *rest = slot
            yield name, target, transpose, (rest[0] if rest else None)

    def stored_name(self, name: str) -> str:
        """The name a tensor is written under in a checkpoint this importer reads."""
        return name if name in self.outside_prefix else self.prefix + name


def per_head_rows(n_heads: int, head_dim: int) -> list:
    """Where each row of a q/k/v matrix interleaved per head ([head][q|k|v][dim], GPT-NeoX and
    BLOOM) goes in the attention's ``qkv`` ([q|k|v][head][dim])."""
    return [part * n_heads * head_dim + head * head_dim + d
            for head in range(n_heads) for part in range(3) for d in range(head_dim)]


def fused_rows(*sizes: int) -> list:
    """Row ranges of tensors stacked one after another in one parameter: sizes (a, b) -> [0..a), [a..a+b)."""
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


# ---------------------------------------------------------------------------------------------
# The training recipe: what optimizer factories receive, and the base of schedules
# ---------------------------------------------------------------------------------------------
#: the roles ``train.param_groups`` may name; every trainable parameter has exactly one
ROLES = ("embeddings", "head", "matrices", "scalars")


@dataclass
class ParamInfo:
    """One trainable parameter as an optimizer factory receives it: ``factory(params, train, **options)``.

    ``role``: ``embeddings`` (the weight of an embedding table; a tied head is its token embedding),
    ``head`` (an untied output head), ``matrices`` (every other tensor of 2 or more dimensions: the
    hidden matrices Muon orthogonalises) or ``scalars`` (tensors of fewer dimensions: gains, biases).
    ``norm`` and ``bias`` say whether it is a norm's parameter or a bias. ``lr_mult`` and
    ``weight_decay`` are what ``train.param_groups`` (else the default: decay ``train.weight_decay``
    on tensors of 2+ dimensions, none below) gave it; ``group`` names the rule that did (``decay``
    and ``no_decay`` by default), and ``gptlab.param_groups`` keeps parameters of different groups apart.
    """

    name: str
    param: "torch.Tensor"
    role: str
    norm: bool
    bias: bool
    lr_mult: float
    weight_decay: float
    group: str

    @property
    def hidden_matrix(self) -> bool:
        """A matrix inside the network (neither an embedding nor the head): what Muon orthogonalises."""
        return self.role == "matrices"


class Schedule:
    """Base class of the schedule kind: ``factory(train, **options)`` -> a Schedule.

    ``multiplier(step, group)`` is the factor applied to each parameter group's peak learning rate
    (``train.lr`` x the group's ``lr_mult``, or the rate an optimizer gave the group) at ``step``
    (1 to ``train.steps``); ``group`` is the group's name, for schedules that treat groups apart.
    ``lr(step, peak, group)`` turns it into a rate; a subclass may compute it directly (the
    built-in cosine does, to keep its arithmetic bit for bit). ``warmup(step)`` is the linear
    warmup every built-in starts with (``train.warmup_steps``), or None past it.
    """

    def __init__(self, train: Any) -> None:
        self.steps = int(train.steps)
        self.warmup_steps = int(train.warmup_steps)
        self.min_lr, self.peak_lr = train.min_lr, float(train.lr)

    def multiplier(self, step: int, group: str = "default") -> float:
        raise NotImplementedError(f"schedule {type(self).__name__} must define multiplier(step, group)")

    def lr(self, step: int, peak: float, group: str = "default") -> float:
        return peak * self.multiplier(step, group)

    def warmup(self, step: int) -> Optional[float]:
        """step / warmup_steps while warming up (from 0), else None."""
        if self.warmup_steps and step <= self.warmup_steps:
            return step / self.warmup_steps
        return None

    def floor(self, default: float) -> float:
        """The multiplier at the end of the decay: ``train.min_lr`` / ``train.lr`` when min_lr is set."""
        return default if self.min_lr is None else self.min_lr / self.peak_lr


# ---------------------------------------------------------------------------------------------
# What each kind receives or may call, beyond its base (all of it is gptlab.<name> too)
# ---------------------------------------------------------------------------------------------
_CFG = "gptlab.config.model.ModelConfig"  # the model config factories of model kinds receive as cfg
_CTX, _CACHE = "gptlab.plugin.components.PositionalContext", "gptlab.plugin.components.KVCache"
_RANGE = "gptlab.plugin.hookspecs.Range"  # option bounds, for any kind's factory annotations

#: kind -> dotted paths of the values its plugins receive and the helpers they may call. Those in
#: higher layers (config, hf, run) are strings because gptlab.plugin imports nothing above it;
#: tests/plugin/test_contract.py resolves every path and checks that gptlab exports it under its name.
_AUX = "gptlab.plugin.components.aux_loss"  # any module's forward may add a named auxiliary loss
_METRIC = "gptlab.plugin.components.aux_metric"  # ... or log a named diagnostic

HELPERS: dict[str, tuple[str, ...]] = {
    "attention": (_CFG, _CTX, _CACHE, "gptlab.plugin.components.mark_residual", "gptlab.plugin.layers.FlexAttention",
                  _AUX, _METRIC, _RANGE),
    "position": (_CFG, _CTX, _AUX, _RANGE),
    "norm": (_CFG, _AUX, _RANGE),
    "norm_placement": (_CFG, _CTX, _CACHE, _AUX, _RANGE),
    "activation": (_CFG, "gptlab.plugin.layers.MLP", "gptlab.plugin.layers.GatedMLP",
                   "gptlab.plugin.components.mark_residual", _AUX, _METRIC, _RANGE),
    "wiring": (_CFG, _AUX, _METRIC, _RANGE),
    "dataset": ("gptlab.plugin.contract.data_path", "gptlab.plugin.contract.file_stamp", _RANGE),
    "tokenizer": (_RANGE,),
    "importer": ("gptlab.plugin.contract.per_head_rows", "gptlab.plugin.contract.fused_rows",
                 "gptlab.hf.helpers.HFConfig", "gptlab.hf.helpers.HFExport", "gptlab.hf.helpers.component",
                 "gptlab.hf.helpers.rope_to_hf", "gptlab.hf.helpers.MAX_WIDTH"),
    "optimizer": ("gptlab.plugin.contract.ParamInfo", "gptlab.config.run.TrainConfig",
                  "gptlab.train.recipe.param_groups", _RANGE),
    "schedule": ("gptlab.config.run.TrainConfig", _RANGE),
    "tracker": ("gptlab.plugin.hookspecs.RunInfo", "gptlab.run.tracking.require", "gptlab.run.tracking.row_metrics",
                "gptlab.run.tracking.final_metrics", "gptlab.run.tracking.grad_norms",
                "gptlab.run.tracking.flat_config", "gptlab.run.tracking.number", "gptlab.run.tracking.metric_key",
                "gptlab.run.tracking.Background", "gptlab.run.tracking.RunSlots"),
    "eval": ("gptlab.plugin.contract.data_path", "gptlab.plugin.contract.Tokenizer", _RANGE),
}


# ---------------------------------------------------------------------------------------------
# Parameter names
# ---------------------------------------------------------------------------------------------
#: the skeleton's (GPTModel's) own parts, role -> attribute name; blocks are numbered under "blocks"
SKELETON = {"tok_emb": "tok_emb", "position": "position", "embedding_norm": "embedding_norm", "blocks": "blocks",
            "final_norm": "final_norm", "head": "head"}
#: the block roles that name sublayers, and the kind whose ``param_names`` continue the name there
SUBLAYERS = {"attn": "attention", "mlp": "activation"}
#: the parameters every declared module may hold
LEAVES = ("weight", "bias")


def param_names(kind: str, component: Any) -> Mapping[str, str]:
    """What ``component`` (a built module of ``kind``, or its class) declares: role -> attribute name."""
    return KINDS[kind].attr(component, "param_names")


def declared_modules(model: Any) -> dict[str, str]:
    """role path -> module name, for every module of a built GPTModel that the skeleton or a component
    declares (``blocks.0.attn.qkv`` -> ``blocks.0.attn.qkv`` with the built-ins). Each holds its
    parameters as ``weight`` and, when it has one, ``bias``: these are the names importers write."""
    out = {"tok_emb": SKELETON["tok_emb"], "head": SKELETON["head"]}
    if model.config.embedding_norm:
        out["embedding_norm"] = SKELETON["embedding_norm"]
    blocks = list(getattr(model, SKELETON["blocks"]))
    if blocks and KINDS["norm_placement"].attr(blocks[0], "final_norm"):
        out["final_norm"] = SKELETON["final_norm"]
    where = SKELETON["position"]
    for role, name in param_names("position", getattr(model, where)).items():
        out[f"position.{role}"] = f"{where}.{name}"
    for i, block in enumerate(blocks):
        for role, name in param_names("norm_placement", block).items():
            path, module = f"blocks.{i}.{role}", f"{SKELETON['blocks']}.{i}.{name}"
            if role in SUBLAYERS:
                for sub_role, sub_name in param_names(SUBLAYERS[role], block.get_submodule(name)).items():
                    out[f"{path}.{sub_role}"] = f"{module}.{sub_name}"
            else:
                out[path] = module
    return out


def declared_parameters(model: Any) -> set[str]:
    """Every parameter name an importer may write for ``model``: each declared module's ``weight``
    and ``bias`` (whether the module has a bias is the model's business)."""
    return {f"{module}.{leaf}" for module in declared_modules(model).values() for leaf in LEAVES}


# ---------------------------------------------------------------------------------------------
# The README's table of kinds, generated from KINDS
# ---------------------------------------------------------------------------------------------
TABLE_START = "<!-- kinds table: generated by python -m gptlab.plugin.contract from gptlab.plugin.hookspecs.KINDS -->"
TABLE_END = "<!-- end of kinds table -->"


def factory_call(kind: Kind) -> str:
    """How gptlab calls the kind's factories, as the README writes it."""
    args = [*kind.positional, *(f"{name}=…" for name in kind.reserved), *(["**options"] if kind.options else [])]
    return f"factory({', '.join(args)})"


def kinds_table() -> str:
    """The README's table of kinds: call, base or protocol, what it returns, attributes gptlab reads."""
    rows = ["| kind | factory call | returns | attributes gptlab reads |", "|---|---|---|---|"]
    for kind in KINDS.values():
        attrs = ", ".join(f"`{name}`" for name in kind.attrs) or "—"
        rows.append(f"| {kind.name} | `{factory_call(kind)}` | `gptlab.{kind.base_name}`: {kind.returns} | {attrs} |")
    return "\n".join(rows)


def readme_table(text: str) -> Optional[str]:
    """The table between the markers of a README's text, or None when the markers are missing."""
    match = re.search(re.escape(TABLE_START) + r"\n(.*?)\n?" + re.escape(TABLE_END), text, re.S)
    return match.group(1) if match else None


def write_readme_table(path: Optional[Path] = None) -> Path:
    """Rewrite the table between the markers of README.md (the checkout's, by default)."""
    path = Path(path or Path(__file__).resolve().parents[2] / "README.md")
    text = path.read_text()
    if readme_table(text) is None:
        raise SystemExit(f"{path}: no kinds table between {TABLE_START!r} and {TABLE_END!r}")
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    path.write_text(text[:start] + "\n" + kinds_table() + "\n" + text[end:])
    return path


__all__ = ["KINDS", "MODEL_KINDS", "Attr", "Kind", "Range", "RunInfo", "hookimpl", *_TORCH_BACKED, "Norm", "Block",
           "FeedForward", "Tracker", "Eval", "Corpus", "Tokenizer", "data_path", "file_stamp", "EXPERIMENT_DIR", "HFImport", "per_head_rows", "fused_rows", "HELPERS",
           "SKELETON", "SUBLAYERS", "LEAVES", "param_names", "declared_modules", "declared_parameters", "kinds_table"]

if __name__ == "__main__":  # python -m gptlab.plugin.contract: regenerate the README's table of kinds
    print(write_readme_table())
