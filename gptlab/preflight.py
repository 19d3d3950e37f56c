"""Everything a user can get wrong, checked before the first run trains.

The real run and ``--dry-run`` call the same checks (the dry run writes nothing), so a dry run
rejects exactly what the real run would: an unwritable results folder, unknown or incompatible
components and bad option values (each model is built on the meta device), the data set and
tokenizer, lengths that do not fit.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .data import TokenData, prepare_tokens
from .errors import ConfigError
from .experiment import Experiment, RunSpec
from .hf import load_hf_weights
from .hookspecs import MODEL_KINDS
from .model import GPTModel, resolve_components
from .plugin_manager import PluginSystem
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


def data_key(spec: RunSpec) -> str:
    """Runs with the same corpus, tokenizer and split share one prepared token array."""
    return json.dumps([spec.data.dataset.to_plain(), spec.data.tokenizer.to_plain(), spec.data.val_fraction],
                      sort_keys=True, default=str)


def check_components(exp: Experiment, plugins: PluginSystem) -> None:
    """Every component name exists and every model builds, before anything trains.

    Each distinct model is built on the meta device (shapes only, no memory), so a bad option
    value (``rope`` with ``base: abc``) is a user error now rather than a failed run later.
    """
    built = set()
    for spec in exp.runs:
        where = f"{exp.path or 'experiment'}: variant '{spec.variant}'"
        try:
            resolve_components(spec.model, plugins)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        key = json.dumps(spec.model.to_dict(), sort_keys=True, default=str)
        if key in built:
            continue
        built.add(key)
        try:
            with torch.device("meta"):
                model = GPTModel(spec.model, plugins=plugins)
            if spec.model.from_hf:  # every checkpoint tensor has a place in this variant's model
                load_hf_weights(model, spec.model.from_hf, plugins, shapes_only=True)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except Exception as exc:  # a factory rejected an option value
            chosen = ", ".join(f"{k}={getattr(spec.model, k).to_plain()}" for k in MODEL_KINDS)
            raise ConfigError(f"{where}: the model cannot be built ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); check the component options in {chosen}") from None


def preflight(exp: Experiment, plugins: PluginSystem, cache_dir: Path, write: bool = True) -> dict[str, TokenData]:
    """Check everything a user can get wrong before the first run starts: components, data, lengths.

    ``write=False`` (a dry run) makes the same checks without creating the token cache.
    """
    check_trackers(exp.track, plugins)  # an unknown sink or a missing package: before any run directory exists
    check_components(exp, plugins)
    data_by_key: dict[str, TokenData] = {}
    for spec in exp.runs:
        where = f"{exp.path or 'experiment'}: variant '{spec.variant}'"
        key = data_key(spec)
        if key not in data_by_key:
            try:
                data_by_key[key] = prepare_tokens(spec.data, plugins, cache_dir, write=write)
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
            if len(tokens) < seq_len + 2:
                raise ConfigError(f"{where}: the {split} split has {len(tokens)} tokens, too few for windows of "
                                  f"{seq_len}; lower model.context_length / train.seq_len or use a bigger corpus")
    return data_by_key
