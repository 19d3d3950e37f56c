"""The plugin contract's hooks and kinds: every hook a gptlab plugin can implement and every kind
of thing it can register. ``gptlab.plugin.contract`` documents, kind by kind, what a factory
returns and what a plugin receives; a plugin author needs those two modules and the README.

A plugin is a module (a ``.py`` file, an installed module, or an entry point in the ``gptlab``
group) with functions named after the hooks below, marked with ``@gptlab.hookimpl``::

    import gptlab

    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "my_attention", MyAttention)

Every function whose name starts with ``gptlab_`` is taken as a hook, so a misspelt hook name is
an error when the plugin loads rather than a hook that silently never runs.

Registration happens once, when the plugin loads. The lifecycle hooks observe a run at log
steps, never inside the forward pass, so the plugin system costs nothing per training step.
They are called one plugin at a time: a plugin whose lifecycle hook raises is named in one warning
line and in the run's summary.json (``hook_errors``), and its lifecycle hooks are switched off for
the rest of that run; the run itself goes on. ``hook_seconds`` in summary.json says how long each
plugin's lifecycle hooks took. Nothing here imports torch. What each kind's factory returns is
documented, class by class, in ``gptlab.plugin.contract`` (``KINDS[kind].base``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pluggy

hookspec = pluggy.HookspecMarker("gptlab")
hookimpl = pluggy.HookimplMarker("gptlab")


# ---------------------------------------------------------------------------------------------
# Kinds: what ``register(kind, name, factory)`` accepts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attr:
    """An attribute gptlab reads off a factory (``on="factory"``) or off what it built (``"module"``)."""

    on: str
    default: Any
    doc: str


@dataclass(frozen=True)
class Range:
    """Bounds on a numeric option, declared once on the factory's keyword argument::

        def rmsnorm(cfg, dim, eps: Annotated[float, Range(gt=0)] = 1e-5): ...

    The registry checks every option a config sets against its annotation (int, float, bool, str,
    Optional[...], a Union of those, list) and these bounds before anything is built, so a
    plugin's options get the same one-line errors as the built-ins'.
    """

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None

    def describe(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if v is not None]
        return " and ".join(parts)

    def holds(self, value: float) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))


@dataclass(frozen=True)
class Kind:
    """How gptlab calls the factories of one kind, and what it reads back.

    A factory is called as ``factory(*positional, *reserved keywords, **options)``: ``positional``
    are supplied by gptlab in that order, ``reserved`` keywords too, and every other keyword
    argument of the factory is a user option (``options`` false: the kind takes none), set in the
    config as ``{name: ..., option: value}`` and checked against the factory's signature, the
    option's type annotation and its ``Range`` before anything is built. A factory may also
    have ``check(cfg, **options)``, called before anything is allocated, that raises
    ``gptlab.ConfigError`` for a config it cannot serve. ``model_key``: the kind is chosen by a
    key of the model config of the same name.

    ``base_name`` names the class or ``typing.Protocol`` that what the factory returns satisfies
    (a tracker's factory returns nothing: its base describes the factory itself); ``base`` is that
    object. It is defined or re-exported in ``gptlab.plugin.contract``, the one module that
    documents every kind, and is ``gptlab.<base_name>`` too.
    """

    name: str
    positional: tuple = ()
    reserved: tuple = ()
    returns: str = ""
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    model_key: bool = False
    base_name: str = ""
    options: bool = True

    @property
    def base(self) -> Any:
        """The class or Protocol ``base_name`` names, from ``gptlab.plugin.contract`` (torch-backed
        bases import torch here, on first access, not when this module loads)."""
        return getattr(import_module(CONTRACT), self.base_name)

    def attr(self, obj: Any, name: str) -> Any:
        """``obj.name``, or the contract's default when the plugin does not set it."""
        return getattr(obj, name, self.attrs[name].default)


#: the module that documents every kind and holds (or re-exports) each kind's base
CONTRACT = "gptlab.plugin.contract"


def _param_names(what: str) -> Attr:
    return Attr("module", {}, f"role -> name (dotted, relative to the {what}) of each submodule an importer may "
                              f"map tensors onto; each holds 'weight' and, if it has one, 'bias'. A class "
                              f"attribute; an instance may replace it when its options change the layout")


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("attention", positional=("cfg",), model_key=True, base_name="CausalSelfAttention",
         returns="a module (x (B, T, C), ctx: PositionalContext, cache: KVCache or None) -> (B, T, C); "
                 "subclass it and write only attend(q, k, v, ctx)",
         attrs={"accepts": Attr("factory", frozenset(),
                                "which of the position's 'rotation' and 'score_bias' it applies"),
                "computes": Attr("factory", None,
                                 "a name for the function it computes, shared by attentions that differ only in "
                                 "their kernel ('causal_softmax': vanilla, sdpa); an exported checkpoint may "
                                 "hold one as the other"),
                "kernel_path": Attr("module", None,
                                    "kernel_path(ctx) -> str: which kernel runs; 'explicit' (the default) means "
                                    "the (T x T) attention matrix is stored, anything else that it is not"),
                "param_names": _param_names("attention; the base: qkv (rows [q; k; v]), out_proj"),
                "trains_on": Attr("factory", None,
                                  "the device types it can train on (frozenset({'cuda'})), None: any; a run on "
                                  "another is refused before training, and the probe runs its forward only")}),
    Kind("position", positional=("cfg",), model_key=True, base_name="PositionScheme",
         returns="subclass it: embed(x, offset), context(offset, q_len, device, dtype), max_length",
         attrs={"provides": Attr("factory", frozenset(),
                                 "the seams it acts through: 'embedding', 'rotation', 'score_bias'"),
                "param_names": _param_names("position; learned: emb, the (context_length, emb_dim) table")}),
    Kind("norm", positional=("cfg", "dim"), model_key=True, base_name="Norm",
         returns="a module normalising the last dimension, its parameters named weight (and bias)"),
    Kind("norm_placement", positional=("cfg",), reserved=("attention", "mlp", "norm"), model_key=True,
         base_name="Block",
         returns="a block (x, ctx, cache=None) -> x; attention() and mlp() build one sublayer each, norm(dim) "
                 "one norm; the block owns the residual wiring",
         attrs={"final_norm": Attr("factory", True, "whether the model needs a norm before the head"),
                "param_names": _param_names("block; roles attn and mlp name the sublayers, the others norms")}),
    Kind("activation", positional=("cfg",), model_key=True, base_name="FeedForward",
         returns="the feed-forward module x -> x; gptlab.MLP.factory(act, doc) and GatedMLP.factory make one",
         attrs={"hidden_dim": Attr("module", None, "hidden width, for the memory estimate (default 4 x emb_dim)"),
                "gated": Attr("module", False, "True when it keeps a gate and an up projection (memory estimate)"),
                "param_names": _param_names("MLP; MLP and GatedMLP: fc (rows [gate; up] when gated), proj")}),
    Kind("wiring", positional=("cfg",), model_key=True, base_name="Wiring",
         returns="subclass it: forward(x, x0, run, n_layers) runs block i as run(i, h) and returns the last "
                 "hidden state; connections across layers (U-net skips, x0 mixing) live here"),
    Kind("dataset", base_name="Corpus",
         returns="fingerprint, which changes whenever the text would, and documents() -> an iterable of str "
                 "(or read() -> the whole text, or tokens() -> ready token arrays) (plugins/dataset_jsonl.py)"),
    Kind("tokenizer", base_name="Tokenizer",
         returns="an instance of a subclass: vocab_size, encode, decode; fit and state for learned vocabularies"),
    Kind("importer", positional=("hf_config", "source"), base_name="HFImport", options=False,
         returns="the gptlab model config and the tensor name map of the Hugging Face family whose config.json "
                 "model_type is the name (plugins/import_gpt2.py)",
         attrs={"to_hf": Attr("factory", None,
                              "to_hf(model config dict) -> the HF config.json dict of this family for a gptlab "
                              "model, or ConfigError naming the component it cannot express (export)")}),
    Kind("optimizer", positional=("params", "train"), base_name="Optimizer",
         returns="a torch.optim.Optimizer over params (gptlab.ParamInfo: name, tensor, role, norm, bias, "
                 "lr_mult, weight_decay, group); gptlab.param_groups(params, lr) groups them. Chosen by "
                 "train.optimizer; gptlab sets each group's lr every step from its peak (plugins/optim_lion.py)"),
    Kind("schedule", positional=("train",), base_name="Schedule",
         returns="a subclass of gptlab.Schedule: multiplier(step, group) of each group's peak learning rate. "
                 "Chosen by train.schedule (plugins/schedule_wsd.py)"),
    Kind("tracker", base_name="Tracker", options=False,
         returns="nothing: the factory is called once before anything trains (--dry-run too), writes nothing "
                 "and raises gptlab.ConfigError when the sink cannot work (its package missing: name the extra). "
                 "The plugin's lifecycle hooks do the tracking, for runs where RunInfo.tracks(name) "
                 "(plugins/track_tensorboard.py)"),
    Kind("eval", base_name="Eval",
         returns="an Eval: called (model, tokenizer, device, autocast) -> {metric: number} at every evaluation step "
                 "on rank 0, the model in eval mode under no_grad; logged as <name>_<metric>. Chosen by evals: "
                 "(plugins/eval_hellaswag.py)"),
)}

MODEL_KINDS = tuple(k.name for k in KINDS.values() if k.model_key)


# ---------------------------------------------------------------------------------------------
# What lifecycle hooks receive
# ---------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """One run, as lifecycle hooks see it."""

    dir: Path  #: the run directory; a sink may write its own files here
    name: str  #: the variant label
    seed: int
    #: the resolved config (model, data, train) plus experiment, variant, seed, config_hash, and
    #: ``track``: the tracker names chosen for this run (operational: not part of config_hash)
    config: dict
    experiment: str
    #: the step a resumed run continues from (its metrics restart after it); None when it starts from scratch
    resumed_from: Optional[int] = None

    def tracks(self, name: str) -> bool:
        """Whether the tracker ``name`` was chosen for this run (``track:`` or ``--track``)."""
        return name in (self.config.get("track") or ())


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------
@hookspec
def gptlab_register(register: Callable[..., None]) -> None:
    """Register components. Called once, when the plugin loads.

    Call ``register(kind, name, factory, override=False)`` for each thing the plugin adds; ``kind``
    is a key of ``KINDS`` above, whose entry says how the factory is called and what it returns.
    The first line of the factory's docstring is what ``gptlab components`` shows. Registering
    a (kind, name) another plugin registered is an error naming both, unless ``override=True``.
    Return nothing.
    """


@hookspec
def gptlab_run_start(run: RunInfo) -> None:
    """A run is about to train: its directory holds config.yaml and a summary.json saying 'running'.

    Called once per run (per attempt: a resumed run starts again, with ``run.resumed_from`` set),
    after the model is built. Return nothing.
    """


@hookspec
def gptlab_log(run: RunInfo, step: int, metrics: Mapping[str, Any]) -> None:
    """A metrics row was written to metrics.jsonl.

    Called every ``train.log_every`` steps, at every evaluation step and at the last step, with the
    row: step, tokens, train_loss, lr, tokens_per_s (None for the first, warm-up interval) and, at
    evaluation steps, val_loss. Return nothing.
    """


@hookspec
def gptlab_eval(run: RunInfo, step: int, metrics: Mapping[str, Any]) -> None:
    """Validation finished at ``step`` (every ``train.eval_every`` steps and at the last step).

    ``metrics`` holds ``step`` and ``val_loss`` (None when the split is too short to evaluate).
    Called before ``gptlab_log`` of the same step. The losses at other lengths
    (``train.eval_lengths``) are computed after training and arrive in ``gptlab_run_end``'s summary.
    Return nothing.
    """


@hookspec
def gptlab_run_end(run: RunInfo, summary: Mapping[str, Any]) -> None:
    """A run ended: completed, diverged, failed or interrupted (``summary["status"]``). Called once per run.

    ``summary`` is what was just saved to summary.json. An exception here is warned about and
    recorded in summary.json (``hook_errors``); it never changes the run's status. Return nothing.
    """


HOOKS = tuple(name for name in dict(globals()) if name.startswith("gptlab_"))
