"""Strict configs: the model config (the seed's GPT_CONFIG_124M keys plus component choices) and
the one mechanism every config section is parsed with.

Unknown keys and wrong types fail here, with the key named and the closest valid key suggested,
so a typo never silently falls back to a default. A section is a dataclass; ``parse_section``
checks each key against the field's annotation, then the dataclass's ``validate()`` checks
ranges and relations between keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError, did_you_mean
from ..plugin.hookspecs import MODEL_KINDS

#: the most blocks gptlab builds: a block takes milliseconds to build even on the meta device (4,096
#: blocks take 10-30 s on a laptop's CPU), so a deeper model would only hang the dry run that checks
#: it; four times the deepest published transformer (DeepNet's 1,000 layers); no flag lifts it
MAX_LAYERS = 4096
#: bytes per parameter of fp32 training with AdamW: weights, gradients and the two moments
TRAINING_BYTES_PER_PARAM = 16

# The seeds' configuration, unchanged (public API).
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


@dataclass(frozen=True)
class ComponentSpec:
    """A component choice: a registered name plus that component's options."""

    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, key: str) -> "ComponentSpec":
        if isinstance(value, ComponentSpec):
            return value
        if isinstance(value, str) and value:
            return cls(value, {})
        if isinstance(value, Mapping):
            value = dict(value)
            name = value.pop("name", None)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{key}: a mapping needs a 'name' key, e.g. {{name: ..., <options>}}")
            return cls(name, value)
        raise ConfigError(f"{key}: expected a component name or {{name: ..., <options>}}, got {value!r}")

    def to_plain(self) -> Union[str, dict]:
        return dict(name=self.name, **self.options) if self.options else self.name


#: the components a ``model.layers`` rule may set for the layers it selects
LAYER_KINDS = ("attention", "activation", "norm", "norm_placement", "position")
#: how a rule selects layers (all of them when it names none): ``at`` (an index or a list; negative
#: counts from the end), ``from``/``to`` (a half-open range, negatives from the end) and ``every``
#: with ``offset`` (i % every == offset); the selectors a rule names must all hold
SELECTORS = ("at", "from", "to", "every", "offset")


def _index(value: Any, where: str, n_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a layer index (an integer; negative counts from the end), got {value!r}")
    if not -n_layers <= value < n_layers:
        raise ConfigError(f"{where}={value} is outside the model's {n_layers} layers "
                          f"(0 to {n_layers - 1}, or -1 to -{n_layers})")
    return value % n_layers


def parse_layer_rule(rule: Any, index: int, n_layers: int) -> tuple[list[int], dict[str, "ComponentSpec"]]:
    """(the layers rule ``index`` of ``model.layers`` selects, the components it sets), or ConfigError
    naming the rule and key."""
    where = f"model.layers[{index}]"
    if not isinstance(rule, Mapping):
        raise ConfigError(f"{where} must be a mapping such as {{every: 4, offset: 3, position: none}}, got {rule!r}")
    for key in rule:
        if key not in SELECTORS and key not in LAYER_KINDS:
            valid = (*SELECTORS, *LAYER_KINDS)
            raise ConfigError(f"unknown {where} key '{key}'{did_you_mean(str(key), valid)}; a rule selects layers "
                              f"with {', '.join(SELECTORS)} and sets {', '.join(LAYER_KINDS)}")
    sets = {kind: ComponentSpec.parse(rule[kind], f"{where}.{kind}") for kind in LAYER_KINDS if kind in rule}
    if not sets:
        raise ConfigError(f"{where} sets no component; give it one of {', '.join(LAYER_KINDS)}")
    chosen = set(range(n_layers))
    if "at" in rule:
        at = rule["at"] if isinstance(rule["at"], (list, tuple)) else [rule["at"]]
        chosen &= {_index(i, f"{where}.at", n_layers) for i in at}
    low = _index(rule["from"], f"{where}.from", n_layers) if "from" in rule else 0
    high = n_layers if "to" not in rule else (
        n_layers if rule["to"] == n_layers else _index(rule["to"], f"{where}.to", n_layers))
    chosen &= set(range(low, high))
    if "every" in rule or "offset" in rule:
        every, offset = rule.get("every", 1), rule.get("offset", 0)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"{where}.every must be a positive integer, got {every!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < every:
            raise ConfigError(f"{where}.offset must be an integer in [0, every), got {offset!r}")
        chosen = {i for i in chosen if i % every == offset}
    if not chosen:
        raise ConfigError(f"{where} selects no layer of the model's {n_layers}; check its "
                          f"{', '.join(k for k in SELECTORS if k in rule)}")
    return sorted(chosen), sets


def describe_layers(rules: list, n_layers: int) -> str:
    """``model.layers`` in words for tables: 'layers 3,7: position=none; layers 6-7: activation=relu2'."""
    parts = []
    for index, rule in enumerate(rules):
        chosen, sets = parse_layer_rule(rule, index, n_layers)
        span = (f"{chosen[0]}-{chosen[-1]}" if len(chosen) > 2 and chosen == list(range(chosen[0], chosen[-1] + 1))
                else ",".join(map(str, chosen)))
        what = ", ".join(f"{kind}={_spec_text(spec)}" for kind, spec in sets.items())
        parts.append(f"layer{'s' if len(chosen) > 1 else ''} {span}: {what}")
    return "; ".join(parts)


def _spec_text(spec: "ComponentSpec") -> str:
    if not spec.options:
        return spec.name
    return spec.name + "(" + ",".join(f"{k}={v}" for k, v in spec.options.items()) + ")"


@dataclass
class ModelConfig:
    """Everything that defines a model. Defaults reproduce the seeds' GPT-124M (tied head), except that
    `gelu` is the exact GELU; the seeds' hand-written one is `gelu_tanh`."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    attention: ComponentSpec = field(default_factory=lambda: ComponentSpec("sdpa"))
    position: ComponentSpec = field(default_factory=lambda: ComponentSpec("learned"))
    norm: ComponentSpec = field(default_factory=lambda: ComponentSpec("layernorm"))
    norm_placement: ComponentSpec = field(default_factory=lambda: ComponentSpec("pre"))
    activation: ComponentSpec = field(default_factory=lambda: ComponentSpec("gelu"))
    ff_dim: Optional[int] = None  # None: 4 * emb_dim (gated MLPs: 2/3 of that, parameter-matched)
    bias: bool = True  # biases of the non-qkv linears and of the norms
    tie_embeddings: bool = True
    gradient_checkpointing: bool = False
    # Keys added after results existed: hashed only when set (see LATER_KEYS), so old runs keep their hashes.
    head_dim: Optional[int] = None  # width of one head; None: emb_dim / n_heads
    embedding_norm: bool = False  # a norm on the token (+ position) embeddings, before the first block (Bloom)
    attn_out_bias: Optional[bool] = None  # bias of the attention output projection; None: as `bias`
    mlp_bias: Optional[bool] = None  # biases of the feed-forward linears; None: as `bias`
    norm_bias: Optional[bool] = None  # biases of the norms that have one (LayerNorm); None: as `bias`
    from_hf: Optional[str] = None  # a Hugging Face checkpoint directory whose weights a run starts from
    # Rows of the embedding and head rounded up to a multiple of this (64 on GPUs: aligned matmuls);
    # the padded rows are never predicted, sampled or counted in the loss. None: no padding.
    vocab_multiple: Optional[int] = None
    # tanh soft cap on the output logits, cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None: none
    logit_softcap: Optional[float] = None
    # weight of the output z-loss, mean(logsumexp(logits)^2) added to the training loss (PaLM: 1e-4); None: none
    z_loss: Optional[float] = None
    # per-layer layout: rules that give the layers they select their own components (see LAYER_KINDS)
    layers: list = field(default_factory=list)
    # how the blocks connect: sequential (every GPT), unet (skips from layer i to L-1-i), x0_mix
    wiring: ComponentSpec = field(default_factory=lambda: ComponentSpec("sequential"))

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and head: vocab_size rounded up to a multiple of ``vocab_multiple``."""
        m = self.vocab_multiple or 1
        return -(-self.vocab_size // m) * m

    @property
    def head_size(self) -> int:
        """The width of one attention head: ``head_dim`` when set, else emb_dim / n_heads."""
        return self.head_dim or self.emb_dim // self.n_heads

    def uses_bias(self, part: str) -> bool:
        """Whether ``part`` ("attn_out", "mlp" or "norm") has a bias: its own switch, else ``bias``."""
        own = getattr(self, f"{part}_bias")
        return self.bias if own is None else own

    def layer_specs(self) -> list[dict[str, "ComponentSpec"]]:
        """Each layer's components (``LAYER_KINDS``): the model's, overridden by every ``layers`` rule
        that selects the layer, in order (a later rule wins)."""
        specs = [{kind: getattr(self, kind) for kind in LAYER_KINDS} for _ in range(self.n_layers)]
        for index, rule in enumerate(self.layers):
            chosen, sets = parse_layer_rule(rule, index, self.n_layers)
            for i in chosen:
                specs[i].update(sets)
        return specs

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_any(cls, cfg: Any) -> "ModelConfig":
        """Build from a dict, an OmegaConf config or a ModelConfig, checking every key and type."""
        if isinstance(cfg, ModelConfig):
            cfg = cfg.to_dict()  # re-check: a dataclass can be built with any values
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"model config must be a mapping, got {type(cfg).__name__}")
        return parse_section(cls, cfg, "model")

    def validate(self) -> None:
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            positive(self, "model", key)
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"model.n_layers is {count(self.n_layers)}, more than the {MAX_LAYERS:,} layers gptlab builds "
                              f"(each takes milliseconds to build, even on the meta device)")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        positive(self, "model", "head_dim")
        if self.head_dim is None and self.emb_dim % self.n_heads:
            raise ConfigError(f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads}), "
                              f"or set model.head_dim")
        positive(self, "model", "ff_dim")
        positive(self, "model", "vocab_multiple")
        for index, rule in enumerate(self.layers):
            parse_layer_rule(rule, index, self.n_layers)
        for key in ("logit_softcap", "z_loss"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{key} must be a finite number > 0, or null (none), got {value}")


def _declared(plugins: Any, kind: str, name: str, attr: str, default: Any) -> Any:
    """What the component registered as ``name`` declares about its size (``default`` if nothing)."""
    try:
        return getattr(plugins.registry.get(kind, name).factory, attr, default)
    except Exception:  # an unknown name: reported by the component check, counted as the default here
        return default


def parameter_parts(cfg: ModelConfig, plugins: Any) -> dict[str, int]:
    """The parameters of a model ``cfg`` describes, by part, computed from the config and what its
    components (registered in ``plugins``) declare, without building anything, so a config claiming
    a huge model costs nothing to measure. Each label names the keys that size its part. Declared,
    with defaults for a component that says nothing: an activation's ``gated`` (False) or its own
    ``parameter_count(cfg, **options)`` (one layer's feed-forward), a norm's
    ``parameter_count(cfg, dim)`` (dim), a block's ``norm_count(options)`` (2) and ``final_norm``
    (True), a position's ``parameter_count(cfg)`` (0), a wiring's and an attention's
    ``parameter_count(cfg, **options)`` (0; the base attention counts its projections and QK-norm). Exact for the built-ins; the meta build then
    gives the exact figure for any model."""
    d, heads, head, vocab = cfg.emb_dim, cfg.n_heads, cfg.head_size, cfg.padded_vocab
    layers = cfg.layer_specs() if cfg.layers else [{kind: getattr(cfg, kind) for kind in LAYER_KINDS}]
    sizes = [_block_parameters(cfg, layer, plugins) for layer in layers]
    if cfg.layers:
        blocks = f"the blocks (n_layers {count(cfg.n_layers)} in {len(set(sizes))} sizes set by model.layers)"
        total = sum(size for size, _ in sizes)
    else:
        (block, hidden), = sizes
        blocks = (f"the blocks (n_layers {count(cfg.n_layers)} x {count(block)} parameters; emb_dim {count(d)}, "
                  f"{count(heads)} heads of {count(head)}, MLP width {count(hidden)})")
        total = cfg.n_layers * block
    parts = {f"the token embedding (vocab_size {count(vocab)} x emb_dim {count(d)})": vocab * d, blocks: total}
    if not cfg.tie_embeddings:
        parts[f"the output head (vocab_size {count(vocab)} x emb_dim {count(d)})"] = vocab * d
    table = _declared(plugins, "position", cfg.position.name, "parameter_count", lambda cfg: 0)(cfg)
    if table:
        parts[f"the position table (context_length {count(cfg.context_length)} x emb_dim {count(d)})"] = table
    norm = _declared(plugins, "norm", cfg.norm.name, "parameter_count", lambda cfg, dim: dim)(cfg, d)
    placement = layers[-1]["norm_placement"]
    final = bool(_declared(plugins, "norm_placement", placement.name, "final_norm", True))
    parts["the norms outside the blocks"] = norm * (final + cfg.embedding_norm)
    wiring = _declared(plugins, "wiring", cfg.wiring.name, "parameter_count", None)
    if callable(wiring):
        parts[f"the wiring ({cfg.wiring.name})"] = int(wiring(cfg, **cfg.wiring.options))
    return parts


def _block_parameters(cfg: ModelConfig, layer: Mapping[str, "ComponentSpec"], plugins: Any) -> tuple[int, int]:
    """(parameters, MLP width) of one block built from ``layer``'s components."""
    d, heads, head = cfg.emb_dim, cfg.n_heads, cfg.head_size
    attn, act = layer["attention"], layer["activation"]
    kv_heads = _positive_int(attn.options.get("n_kv_heads")) or heads
    q, kv = heads * head, kv_heads * head
    gated = bool(_declared(plugins, "activation", act.name, "gated", False))
    hidden = _positive_int(act.options.get("hidden_dim")) or cfg.ff_dim or (int(round(8 * d / 3)) if gated else 4 * d)
    norm = _declared(plugins, "norm", layer["norm"].name, "parameter_count", lambda cfg, dim: dim)(cfg, d)
    attention = d * (q + 2 * kv) + (q + 2 * kv) * cfg.qkv_bias + q * d + d * cfg.uses_bias("attn_out")
    counted = _declared(plugins, "attention", attn.name, "parameter_count", None)
    if callable(counted):  # the attention counts itself (QK-norm gains, value embeddings)
        attention = int(counted(cfg, **attn.options))
    fc = hidden * (2 if gated else 1)
    mlp = d * fc + hidden * d + (fc + d) * cfg.uses_bias("mlp")
    declared = _declared(plugins, "activation", act.name, "parameter_count", None)
    if callable(declared):  # a feed-forward that is no MLP (experts) counts itself
        mlp = int(declared(cfg, **act.options))
    placement = layer["norm_placement"]
    norms = _declared(plugins, "norm_placement", placement.name, "norm_count", lambda options: 2)(placement.options)
    return attention + mlp + norms * norm, hidden


def size_problem(cfg: ModelConfig, limit: int, plugins: Any, parameters: Optional[int] = None,
                 buffer_bytes: int = 0, batch_tokens: int = 0,
                 limit_name: str = "this machine's memory") -> Optional[str]:
    """Why training ``cfg`` needs more than ``limit`` bytes, or None when it does not.

    What is counted is a lower bound of what training needs on any device: the fp32 training state
    (``TRAINING_BYTES_PER_PARAM`` a parameter), the model's buffers and, for a batch of
    ``batch_tokens`` tokens, the embedding output and the logits in a 2-byte dtype. ``parameters``
    is the exact count when the model was built on the meta device; otherwise the config's
    analytic count (``parameter_parts``) is used."""
    parts = parameter_parts(cfg, plugins)
    n = sum(parts.values()) if parameters is None else parameters
    state = TRAINING_BYTES_PER_PARAM * n
    activations = 2 * batch_tokens * (cfg.emb_dim + cfg.padded_vocab)
    need = state + buffer_bytes + activations
    if need <= limit:
        return None
    largest = max(parts, key=parts.get)
    shares = {largest: TRAINING_BYTES_PER_PARAM * parts[largest],
              "the buffers (tables sized by context_length)": buffer_bytes,
              f"the activations of one batch (train.batch_size x seq_len = {count(batch_tokens)} tokens)": activations}
    figures = f"{'about ' if parameters is None else ''}{count(n)} parameters take {count_bytes(state)} as fp32 " \
              f"weights, gradients and AdamW state ({TRAINING_BYTES_PER_PARAM} bytes each)"
    extra = [what.format(count_bytes(b)) for b, what in ((buffer_bytes, "{} of buffers"),
                                                         (activations, "at least {} of activations"))
             if b * 10 >= need]  # only what matters to the sum
    if extra:
        figures += f", plus {' and '.join(extra)}: {count_bytes(need)} in all"
    return (f"the model is too large to train here: {figures}, more than {limit_name} ({count_bytes(limit)}); "
            f"most of it is {max(shares, key=shares.get)}")


def _positive_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def count(n: int) -> str:
    """An integer for a message: 1,234,567 up to 10^15, then 1.23e+20 (any size, never an error)."""
    if n < 10 ** 15:
        return f"{n:,}"
    return f"{float(n):.3g}" if n.bit_length() < 1000 else "more than 1e300"


def count_bytes(n: int) -> str:
    """A byte count for a message: 1.5 GB, 3.2 TB, 1.2e+08 EB."""
    for unit, size in (("EB", 10 ** 18), ("PB", 10 ** 15), ("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 10 ** 300 else "more than 1e300 bytes"
    return f"{n:,} bytes"


#: model keys added after the first results were written, with the value that means "as before";
#: a config hash leaves a key out while it has that value, so existing runs keep their identity
LATER_KEYS = {"head_dim": None, "embedding_norm": False, "attn_out_bias": None, "mlp_bias": None,
              "norm_bias": None, "from_hf": None, "vocab_multiple": None, "logit_softcap": None, "z_loss": None,
              "layers": [], "wiring": "sequential"}


def hashed_model(model: dict) -> dict:
    """The model section as the config hash sees it (``LATER_KEYS`` at their old meaning dropped)."""
    return {k: v for k, v in model.items() if not (k in LATER_KEYS and v == LATER_KEYS[k])}


assert set(MODEL_KINDS) <= {f.name for f in fields(ModelConfig)}, "every model kind is a ModelConfig key"


# ---------------------------------------------------------------------------------------------
# The strict-section mechanism
# ---------------------------------------------------------------------------------------------
def parse_section(cls: type, values: Any, section: str) -> Any:
    """Build the dataclass ``cls`` from a mapping, naming the key on any unknown key or bad type,
    then run its ``validate()``."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"unknown {section} key '{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    out = cls(**kwargs)
    out.validate()
    return out


def to_plain(obj: Any) -> dict:
    """A config dataclass as plain data (component choices as a name or {name, options})."""
    return {f.name: (v.to_plain() if isinstance(v, ComponentSpec) else v)
            for f in fields(obj) for v in [getattr(obj, f.name)]}


def positive(obj: Any, section: str, key: str) -> None:
    """Fail unless ``obj.key`` is None or a positive number (below 2**63, the most torch can count)."""
    v = getattr(obj, key)
    if v is not None and v <= 0:
        raise ConfigError(f"{section}.{key} must be a positive integer, got {v}")
    if v is not None and v >= 2 ** 63:
        raise ConfigError(f"{section}.{key} must be a positive integer below 2**63, got {count(v)}")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if hint is ComponentSpec:
        return ComponentSpec.parse(value, key)
    if get_origin(hint) is Union:
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, int) and abs(value) >= 2 ** 1000:  # float() would raise OverflowError
            raise ConfigError(f"{key} must be a number below 1e300, got an integer of {len(str(value))} digits")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}
    if hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    raise TypeError(f"{key}: no rule for annotation {hint!r}")  # a programming error in a config class
