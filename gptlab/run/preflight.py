"""Everything a user can get wrong, checked before the first run trains.

The real run and ``--dry-run`` call the same checks (the dry run writes nothing), so a dry run
rejects exactly what the real run would: an unwritable results folder, unknown or incompatible
components and bad option values (each model is built on the meta device), models too large for
the machine (measured from the config before the meta build, and exactly after it), a forward
and backward pass of every distinct model at a tiny batch (so a plugin that crashes in ``forward``
or ``backward`` is named before anything trains), the data set and tokenizer, lengths that do not fit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.tokens import TokenData, prepare_tokens
from ..config.model import size_problem, to_plain
from ..errors import ConfigError, one_line
from .experiment import Experiment
from ..config.run import RunSpec
from ..hf.checkpoint import load_hf_weights
from ..plugin.hookspecs import KINDS, MODEL_KINDS
from ..model.gpt import GPTModel, layer_components, resolve_components
from ..plugin.manager import PluginSystem
from ..train.loop import make_evals
from ..train.recipe import check_recipe
from .tracking import check_trackers


def check_writable(results_dir: Path) -> None:
    """Fail early, leaving nothing behind, when the results directory could not be written.

    Permission bits say little to root or on special file systems (/proc), so the nearest existing
    folder is tried for real: a temporary folder is made in it and removed at once.
    """
    probe = Path(results_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    reason = "is not a directory" if not probe.is_dir() else None
    if reason is None:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".gptlab-probe-", dir=probe))
        except OSError as exc:
            reason = f"is not writable ({exc.strerror or type(exc).__name__})"
    if reason:
        raise ConfigError(f"results directory {results_dir} cannot be created: {probe} {reason}; "
                          f"choose another with --results-dir")


def machine_memory() -> int:
    """The most memory one run could have here: the larger of this machine's RAM (or a smaller
    cgroup limit: a container, a Slurm job) and the largest visible GPU's memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        ram = 0
    for file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(file) as fh:
                text = fh.read(64).strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (ram or float("inf")):
            ram = int(text)
    gpu = 0
    try:
        if torch.cuda.is_available():
            gpu = max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    except Exception:  # a broken driver: the RAM alone
        pass
    return max(ram, gpu) or 16 * 2 ** 30


def check_size(spec: RunSpec, limit: int, plugins: PluginSystem, measured: tuple[int, int] | None = None) -> None:
    """Refuse a run whose model and batch cannot fit in ``limit`` bytes: counted from the config, or
    with ``measured`` (parameters, buffer bytes) from the model built on the meta device."""
    seq_len = spec.train.seq_len or spec.model.context_length
    exact = {} if measured is None else {"parameters": measured[0], "buffer_bytes": measured[1]}
    problem = size_problem(spec.model, limit, plugins, batch_tokens=spec.train.batch_size * seq_len, **exact)
    if problem:
        source = f"model.from_hf {spec.model.from_hf}: " if spec.model.from_hf else ""
        raise ConfigError(f"{source}{problem}; shrink it, or pass --allow-large to gptlab run to try anyway")


def data_key(spec: RunSpec) -> str:
    """Runs with the same corpus, tokenizer and split share one prepared token array."""
    return json.dumps([spec.data.dataset.to_plain(), spec.data.tokenizer.to_plain(), spec.data.val_fraction],
                      sort_keys=True, default=str)


def check_components(exp: Experiment, plugins: PluginSystem, device_type: str = "cpu") -> None:
    """Every component name exists and every model builds, before anything trains.

    Each distinct model is built on the meta device (shapes only, no memory), so a bad option
    value (``rope`` with ``base: abc``) is a user error now rather than a failed run later. Its size
    is checked first from the config (a model of 10^12 parameters is never built, even on the meta
    device) and again exactly once built, buffers included (``--allow-large`` skips both).
    """
    measured: dict[str, tuple[int, int]] = {}  # model -> (parameters, buffer bytes), built once
    built: dict[str, GPTModel] = {}  # model -> its meta-device build, for each recipe that trains it
    recipes: set[str] = set()
    limit = None if getattr(exp, "allow_large", False) else machine_memory()
    for spec in exp.runs:
        where = f"{exp.path or 'experiment'}: variant '{spec.variant}'"
        key = json.dumps(spec.model.to_dict(), sort_keys=True, default=str)
        recipe = json.dumps([key, to_plain(spec.train)], sort_keys=True, default=str)
        try:
            resolve_components(spec.model, plugins)
            check_trainable(spec.model, plugins, device_type)
            if key in measured:
                if limit is not None:  # the same model, maybe with another batch
                    check_size(spec, limit, plugins, measured[key])
                if recipe not in recipes:  # the same model, another optimizer, schedule or groups
                    check_recipe(built[key], spec.train, plugins)
                    recipes.add(recipe)
                continue
            if limit is not None:
                check_size(spec, limit, plugins)  # from the config: nothing is built for a model far too large
            with torch.device("meta"):
                model = GPTModel(spec.model, plugins=plugins)
            measured[key] = (model.num_parameters(), sum(b.numel() * b.element_size() for b in model.buffers()))
            built[key] = model
            check_recipe(model, spec.train, plugins)  # optimizer, schedule and param_groups on this model
            recipes.add(recipe)
            if limit is not None:
                check_size(spec, limit, plugins, measured[key])
            if spec.model.from_hf:  # every checkpoint tensor has a place in this variant's model
                load_hf_weights(model, spec.model.from_hf, plugins, shapes_only=True)
            check_forward(spec, plugins)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except Exception as exc:  # a factory rejected an option value
            chosen = ", ".join(f"{k}={getattr(spec.model, k).to_plain()}" for k in MODEL_KINDS)
            raise ConfigError(f"{where}: the model cannot be built ({type(exc).__name__}: {one_line(exc)}); "
                              f"check the component options in {chosen}") from None


#: the probe's model keeps at most this many layers (a plugin's code is the same in every layer) and
#: runs windows of at most this many tokens: a dry run of a 1.5B-parameter model stays cheap; a
#: probe model whose weights and gradients would take more than PROBE_BYTES (a deliberate giant
#: under --allow-large) is not probed
PROBE_LAYERS, PROBE_TOKENS, PROBE_BYTES = 2, 32, 4 << 30


class ForwardFailed(ConfigError):
    """A model that builds but cannot take one training step (its message names the plugin)."""


def untrainable(cfg, plugins: PluginSystem, device_type: str) -> list[str]:
    """The components of ``cfg`` (any layer) that declare they cannot train on ``device_type``
    (``trains_on``: FlexAttention has no CPU backward in torch)."""
    found = []
    for layer in layer_components(cfg, plugins):
        for kind, (entry, _) in layer.items():
            if "trains_on" in KINDS[kind].attrs:
                devices = KINDS[kind].attr(entry.factory, "trains_on")
                if devices is not None and device_type not in devices and f"{kind} '{entry.name}'" not in found:
                    found.append(f"{kind} '{entry.name}'")
    return found


def check_trainable(cfg, plugins: PluginSystem, device_type: str) -> None:
    """Refuse, before anything trains, a model with a component that cannot train on this device."""
    bad = untrainable(cfg, plugins, device_type)
    if bad:
        raise ConfigError(f"{bad[0]} cannot train on {device_type}: torch has no backward for its kernel there "
                          f"(it evaluates and generates there); train it with --device cuda")


def check_forward(spec: RunSpec, plugins: PluginSystem) -> None:
    """Run one forward and backward pass of ``spec``'s model (at most PROBE_LAYERS layers, batch 1,
    PROBE_TOKENS tokens, on the CPU in float32, random weights; none above PROBE_BYTES) and raise
    ForwardFailed naming the plugin whose code raised, so a broken ``forward`` stops the command
    instead of failing every run mid-training. The random streams of the runs are left as they were."""
    # a layout (model.layers) names layers by index: its probe keeps every layer
    layers = spec.model.n_layers if spec.model.layers else min(spec.model.n_layers, PROBE_LAYERS)
    cfg = dataclasses.replace(spec.model, n_layers=layers, from_hf=None)
    tokens = max(1, min(spec.train.seq_len or cfg.context_length, PROBE_TOKENS))
    with torch.device("meta"):
        if GPTModel(cfg, plugins=plugins).num_parameters() * 8 > PROBE_BYTES:  # float32 weights + gradients
            return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = GPTModel(cfg, plugins=plugins).train()
            window = torch.randint(0, cfg.vocab_size, (1, tokens + 1))
            if untrainable(cfg, plugins, "cpu"):  # trains elsewhere only: the probe runs its forward
                with torch.no_grad():
                    model(window[:, :-1], targets=window[:, 1:])
            else:
                model(window[:, :-1], targets=window[:, 1:]).backward()
        except Exception as exc:
            culprit = _raising_plugin(exc, plugins, _entries(cfg, plugins))
            raise ForwardFailed(f"one training step of this model fails in {culprit} ({one_line(exc, kind=True)}); "
                                f"fix the plugin or choose another component") from None


def _entries(cfg, plugins: PluginSystem) -> dict:
    try:
        return resolve_components(cfg, plugins)
    except Exception:
        return {}


def _raising_plugin(exc: BaseException, plugins: PluginSystem, entries: dict) -> str:
    """The innermost plugin module in ``exc``'s traceback, with the components it registered for
    this model ("plugin 'my_attention' (attention 'my_attention')"); gptlab's own code if none."""
    modules = {getattr(p, "__name__", None): plugins.pm.get_name(p) for p in plugins.pm.get_plugins()}
    tb, name = exc.__traceback__, None
    while tb is not None:
        found = modules.get(tb.tb_frame.f_globals.get("__name__"))
        name = found or name
        tb = tb.tb_next
    if name is None:
        return "gptlab's model code"
    mine = [f"{kind} '{entry.name}'" for kind, entry in entries.items() if entry.plugin == name]
    return f"plugin '{name}'" + (f" ({', '.join(mine)})" if mine else "")


def check_evals(exp: Experiment, plugins: PluginSystem) -> None:
    """Every eval of every run is registered, takes the options given and builds (its files are
    there), once per distinct list, before anything trains: the same checks as any component's."""
    seen: set[str] = set()
    for spec in exp.runs:
        key = json.dumps([spec.resolved().get("evals"), str(spec.base_dir)], sort_keys=True, default=str)
        if not spec.evals or key in seen:
            continue
        seen.add(key)
        try:
            make_evals(spec.evals, plugins, experiment_dir(exp))
        except ConfigError as exc:
            raise ConfigError(f"{exp.path or 'experiment'}: variant '{spec.variant}': {exc}") from None


def experiment_dir(exp: Experiment) -> Optional[Path]:
    """Where an experiment's relative data paths start: its file's folder (None: no file)."""
    return Path(exp.path).resolve().parent if exp.path is not None else None


def preflight(exp: Experiment, plugins: PluginSystem, cache_dir: Path, write: bool = True,
              device_type: str = "cpu", progress: Optional[Callable] = None) -> dict[str, TokenData]:
    """Check everything a user can get wrong before the first run starts: components, data, lengths.

    ``write=False`` (a dry run) makes the same checks without creating the token cache.
    ``progress(spec)`` returns a progress callback for preparing that run's corpus, or None.
    """
    check_trackers(exp.track, plugins)  # an unknown sink or a missing package: before any run directory exists
    check_components(exp, plugins, device_type)
    check_evals(exp, plugins)
    data_by_key: dict[str, TokenData] = {}
    for spec in exp.runs:
        where = f"{exp.path or 'experiment'}: variant '{spec.variant}'"
        key = data_key(spec)
        if key not in data_by_key:
            try:
                data_by_key[key] = prepare_tokens(spec.data, plugins, cache_dir, write=write,
                                                  base_dir=experiment_dir(exp),
                                                  progress=progress(spec) if progress else None)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        data = data_by_key[key]
        seq_len = spec.train.seq_len or spec.model.context_length
        if data.tokenizer.vocab_size > spec.model.vocab_size:
            raise ConfigError(f"{where}: tokenizer '{spec.data.tokenizer.name}' has {data.tokenizer.vocab_size} "
                              f"tokens but model.vocab_size is {spec.model.vocab_size}; "
                              f"set model.vocab_size={data.tokenizer.vocab_size}")
        if seq_len > spec.model.context_length:
            raise ConfigError(f"{where}: train.seq_len {seq_len} exceeds model.context_length "
                              f"{spec.model.context_length}; lower train.seq_len or raise the context")
        for split, tokens in (("training", data.train), ("validation", data.val)):
            if len(tokens) < seq_len + 2 and data.complete:  # a dry run's sample of a large corpus: unknown
                raise ConfigError(f"{where}: the {split} split has {len(tokens)} tokens, too few for windows of "
                                  f"{seq_len}; lower model.context_length / train.seq_len or use a bigger corpus")
    return data_by_key
