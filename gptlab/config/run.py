"""The sections of an experiment besides the model: ``data``, ``train`` and ``slurm``.

Parsed like the model config, by ``gptlab.config.model.parse_section``; each ``validate`` holds the
rules a type cannot say.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .model import ComponentSpec, ModelConfig, count, hashed_model, positive, to_plain
from ..errors import ConfigError, did_you_mean
from ..plugin.contract import ROLES
from ..rundir import run_dir_name


#: what a ``train.param_groups`` rule may set for the parameters it matches
GROUP_SETTINGS = ("lr_mult", "weight_decay")


@dataclass
class DataConfig:
    """Which corpus and tokenizer, how much of it is held out for validation, and how a documents
    corpus is prepared (``workers``, ``shard_tokens``: they change how, never which tokens)."""

    dataset: ComponentSpec = field(default_factory=lambda: ComponentSpec("python_docs"))
    tokenizer: ComponentSpec = field(default_factory=lambda: ComponentSpec("bytes"))
    val_fraction: float = 0.1
    workers: Optional[int] = None  # tokenizing processes; None: the cores available
    shard_tokens: int = 100_000_000  # tokens per shard file at most

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.workers is not None and not 1 <= self.workers <= 1024:
            raise ConfigError(f"data.workers must be an integer from 1 to 1024, or null (the cores available), "
                              f"got {self.workers}")
        if not 1 <= self.shard_tokens < 2 ** 40:
            raise ConfigError(f"data.shard_tokens must be a positive number of tokens per shard file (e.g. "
                              f"100000000), got {self.shard_tokens}")


@dataclass
class TrainConfig:
    """Optimisation, evaluation and logging settings for one run."""

    steps: int = 200
    batch_size: int = 16
    seq_len: Optional[int] = None  # None: model.context_length
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: lr / 10 at the end of the cosine
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: Optional[float] = 1.0  # null or 0 turns clipping off
    optimizer: ComponentSpec = field(default_factory=lambda: ComponentSpec("adamw"))  # a registered optimizer
    schedule: ComponentSpec = field(default_factory=lambda: ComponentSpec("cosine"))  # a registered schedule
    # rule (a role in ROLES or a glob on parameter names) -> {lr_mult, weight_decay}
    param_groups: dict = field(default_factory=dict)
    eval_every: int = 50
    eval_batches: int = 8
    eval_lengths: list = field(default_factory=list)  # extra eval lengths as multiples of seq_len
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False
    checkpoint: bool = False  # save model.safetensors at the end
    checkpoint_every: Optional[int] = 500  # steps between resumable states; null or 0: none
    checkpoint_keep: int = 2  # resumable states kept (the newest)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "seq_len",
                    "checkpoint_keep"):
            positive(self, "train", key)
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0 (0 or null: no resumable states), "
                              f"got {self.checkpoint_every}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.min_lr is not None and not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ConfigError(f"train.min_lr must be a finite number >= 0 or null (lr / 10), got {self.min_lr}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr {self.min_lr} is above train.lr {self.lr}: the schedule would decay "
                              f"upward; set min_lr <= lr")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{key} must be in [0, 1), got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"train.grad_clip must be a finite number >= 0, or null (0 and null: no clipping), "
                              f"got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        for m in self.eval_lengths:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 \
                    or (isinstance(m, float) and not math.isfinite(m)):
                raise ConfigError(f"train.eval_lengths holds finite multiples of seq_len > 0 (e.g. [1, 2, 4]), "
                                  f"got {m!r}")
        if self.seq_len is not None:
            self.check_eval_lengths(self.seq_len)
        self.check_param_groups()

    def check_param_groups(self) -> None:
        """Each rule of ``param_groups`` is a non-empty string mapped to {lr_mult, weight_decay}; whether
        it matches a parameter is checked against the built model (``gptlab.train.recipe``)."""
        for rule, settings in self.param_groups.items():
            where = f"train.param_groups.{rule}"
            if not isinstance(rule, str) or not rule.strip():
                raise ConfigError(f"train.param_groups: a rule is a role ({', '.join(ROLES)}) or a glob on "
                                  f"parameter names such as 'blocks.*.attn.*', got {rule!r}")
            if not isinstance(settings, Mapping) or not settings:
                raise ConfigError(f"{where} must be a mapping such as {{lr_mult: 2.0, weight_decay: 0.0}}, "
                                  f"got {settings!r}")
            for key, value in settings.items():
                if key not in GROUP_SETTINGS:
                    raise ConfigError(f"unknown {where} key '{key}'{did_you_mean(str(key), GROUP_SETTINGS)}; "
                                      f"valid keys: {', '.join(GROUP_SETTINGS)}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < 0 or (key == "lr_mult" and value == 0):
                    rule_text = "> 0" if key == "lr_mult" else ">= 0"
                    raise ConfigError(f"{where}.{key} must be a finite number {rule_text}, got {value!r}")


    def check_eval_lengths(self, seq_len: int) -> None:
        """Every eval length, ``round(multiple x seq_len)`` tokens, is at least one token (called again
        once seq_len is known when it is null: model.context_length)."""
        for m in self.eval_lengths:
            if m * seq_len >= 2 ** 63:
                shown = count(m) if isinstance(m, int) else f"{m:.3g}"
                raise ConfigError(f"train.eval_lengths: {shown} x seq_len {seq_len} is more tokens than torch "
                                  f"can count (2**63)")
            if round(m * seq_len) < 1:
                raise ConfigError(f"train.eval_lengths: {m!r} x seq_len {seq_len} rounds to "
                                  f"{round(m * seq_len)} tokens; each length must be at least 1 token "
                                  f"(a multiple above {0.5 / seq_len:.3g})")


#: train keys that change how a run is kept, never what it computes: left out of the config hash,
#: so changing them neither reruns finished runs nor sets a run apart from the experiment's
OPERATIONAL_TRAIN_KEYS = ("checkpoint_every", "checkpoint_keep")
OPERATIONAL_DATA_KEYS = ("workers", "shard_tokens")

#: train keys added after results existed, with the value that means "as before": the config hash
#: leaves a key out while it has that value, so existing runs keep their identity
LATER_TRAIN_KEYS = {"optimizer": "adamw", "schedule": "cosine", "param_groups": {}}


#: where each flag of ``gptlab run --launcher slurm`` lands in the experiment's ``slurm:`` section
SLURM_FLAGS = {"partition": "--partition", "gpus_per_run": "--gpus-per-run", "time": "--time", "mem": "--mem",
               "array_parallelism": "--array-parallelism"}


@dataclass
class SlurmConfig:
    """What each run asks Slurm for (``gptlab run --launcher slurm``). It changes where a run trains,
    never what it computes, so it is no part of any run's config hash; None leaves the choice to
    Slurm (or, for ``time``, asks the user)."""

    partition: Optional[str] = None
    gpus_per_run: Optional[int] = None
    time: Optional[int] = None  # minutes each run may take (the scheduler's time limit per task)
    mem: Optional[float] = None  # GB of memory per run
    array_parallelism: Optional[int] = None  # runs of the array Slurm starts at once

    def validate(self) -> None:
        def bad(key: str, rule: str, value: object) -> ConfigError:
            return ConfigError(f"slurm.{key} ({SLURM_FLAGS[key]}) must be {rule}, got {value!r}")

        if self.partition is not None and (not self.partition.strip() or any(c.isspace() for c in self.partition)):
            raise bad("partition", "a partition name such as gpu", self.partition)
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise bad("gpus_per_run", "an integer >= 0", self.gpus_per_run)
        if self.time is not None and self.time <= 0:
            raise bad("time", "a positive number of minutes", self.time)
        if self.mem is not None and not (math.isfinite(self.mem) and self.mem > 0):
            raise bad("mem", "a positive number of GB", self.mem)
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise bad("array_parallelism", "a positive integer", self.array_parallelism)


SECTIONS = ("model", "data", "train")  #: the sections of a run's config, in order
#: the downstream evaluations of a run (a list of eval components), beside the sections: in a run's
#: resolved config and its hash only when it lists some, so runs without evals keep their identity
EVALS = "evals"


def parse_evals(value: Any, where: str = EVALS) -> tuple:
    """``evals:`` as written (null, a name, or a list of names and ``{name: ..., <options>}``) ->
    ComponentSpecs. An eval's metrics are named after it, so one name may appear only once."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    specs = tuple(ComponentSpec.parse(item, f"{where}[{i}]") for i, item in enumerate(items))
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{where}: eval '{name}' is listed twice; its metrics ({name}_...) would clash, "
                              f"so list each eval once")
    return specs


def evals_plain(evals: Any) -> list:
    """Eval specs as plain data (a name, or {name, options}), as config.yaml and the hash hold them."""
    return [spec.to_plain() for spec in evals]


def flatten_config(config: Mapping[str, Any], leaf: Callable[[Any], Any] = lambda value: value) -> dict:
    """model/data/train as dotted keys, each value passed through ``leaf``; a component mapping
    gives its name plus one key per option (``model.position`` = rope, ``model.position.base``)."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if "name" in value:
                out[key] = leaf(value["name"])
            for k, v in value.items():
                if k != "name":
                    put(f"{key}.{k}", v)
        else:
            out[key] = leaf(value)

    for section in SECTIONS:
        values = config.get(section)
        for key, value in (values.items() if isinstance(values, Mapping) else ()):
            put(f"{section}.{key}", value)
    evals = config.get(EVALS)
    for item in (evals if isinstance(evals, list) else ()):  # evals.hellaswag = hellaswag, .limit = 500
        spec = item if isinstance(item, Mapping) else {"name": item}
        if isinstance(spec.get("name"), str):
            put(f"{EVALS}.{spec['name']}", spec)
    return out


@dataclass
class RunSpec:
    """One training run: a variant label, a seed and its resolved, checked config."""

    variant: str
    seed: int
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    changes: dict = field(default_factory=dict)  # dotted keys this variant sets, for display
    evals: tuple = ()  # ComponentSpecs of the eval kind (``evals:``), run at every evaluation step
    #: the experiment file's folder, where an eval's relative paths start (where the run is, not what)
    base_dir: Optional[Path] = None

    def resolved(self) -> dict:
        out = {"model": self.model.to_dict(), "data": to_plain(self.data), "train": to_plain(self.train)}
        if self.evals:  # absent, not empty, without evals: such a run keeps the hash it always had
            out[EVALS] = evals_plain(self.evals)
        return out

    @property
    def config_hash(self) -> str:
        return config_hash(self.resolved())

    @property
    def dir_name(self) -> str:
        return run_dir_name(self.variant, self.config_hash, self.seed)


def check_block(raw: Any, name: str, keys: tuple, example: str, where: str) -> None:
    """A top-level block of an experiment (``tune:``, ``scale:``) is a mapping of known keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{name}' must be a mapping, e.g. {example}")
    for k in raw:
        if k not in keys:
            raise ConfigError(f"{where}: {name}: unknown key '{k}'{did_you_mean(str(k), keys)}; keys: {', '.join(keys)}")


def check_seeds(seeds: Any, key: str, example: str, where: str) -> list:
    """A list of seeds: non-empty, distinct integers that torch accepts (0 to 2**63-1). ``key`` is
    the name as messages show it (``'seeds'``, ``tune.seeds``)."""
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in seeds):
        raise ConfigError(f"{where}: {key} must be a non-empty list of integers from 0 to 2**63-1, "
                          f"e.g. {example}, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: {key} lists a seed twice: {seeds}")
    return seeds


def config_hash(resolved: dict) -> str:
    """The run's identity: a hash of every key that can change what it computes or records. The
    evals a run measures are part of it (they add metrics to its files), but only when it has some:
    ``evals`` absent or empty hashes as the run did before evals existed."""
    train = {k: v for k, v in (resolved.get("train") or {}).items() if k not in OPERATIONAL_TRAIN_KEYS
             and not (k in LATER_TRAIN_KEYS and v == LATER_TRAIN_KEYS[k])}
    view = {**resolved, "train": train}
    if not view.get(EVALS):
        view.pop(EVALS, None)
    if isinstance(resolved.get("data"), dict):
        view["data"] = {k: v for k, v in resolved["data"].items() if k not in OPERATIONAL_DATA_KEYS}
    if isinstance(resolved.get("model"), dict):
        view["model"] = hashed_model(resolved["model"])
    blob = json.dumps(view, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
