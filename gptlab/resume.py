"""The resumable state of a run: everything needed to continue training exactly where it stopped.

A state is a folder ``resume/step_00000500/`` in the run directory holding
  model.safetensors   the weights (shared tensors such as a tied head stored once)
  train.safetensors   AdamW's moments and step counts, every RNG state (torch's global generator,
                      CUDA's, the batch sampler's), as tensors
  state.json          the step, the loop's counters and running losses, the number of metrics.jsonl
                      rows written so far, elapsed times, and the sha256 of both tensor files
Nothing needs pickle to read. A state is written under a temporary name and renamed into place,
so a kill mid-write leaves the previous state usable; a state whose files do not match the
hashes in its state.json is never used. One process writes (rank 0 of a multi-process run,
later); any process can read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .rundir import RESUME, file_sha256

_STEP = re.compile(r"^step_(\d{8})$")
FORMAT = 1


@dataclass
class Resumable:
    """A state read back: where to continue from."""

    path: Path
    step: int
    info: dict  # state.json
    tensors: dict  # train.safetensors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generators: dict, info: dict, keep: int) -> Path:
    """Write the state after ``step`` atomically, then drop all but the newest ``keep`` states.

    ``generators``: name -> torch.Generator whose state is saved; ``info``: JSON-able counters.
    """
    from safetensors.torch import save_file, save_model

    root = Path(run_dir) / RESUME
    root.mkdir(exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors = {f"rng.{name}": gen.get_state().cpu() for name, gen in generators.items()}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "train.safetensors"))
    body = {**info, "format": FORMAT, "step": step,
            "sha256": {name: file_sha256(tmp / name) for name in ("model.safetensors", "train.safetensors")}}
    (tmp / "state.json").write_text(json.dumps(body, indent=1, sort_keys=True))
    for name in ("model.safetensors", "train.safetensors", "state.json"):
        _fsync(tmp / name)
    if final.exists():  # the same step saved before (a resumed run re-saving): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in sorted(states(run_dir))[:-max(1, keep)]:
        shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)
    return final


def states(run_dir: Path) -> list[int]:
    """Steps of the complete-looking states in ``run_dir`` (unverified), oldest first."""
    root = Path(run_dir) / RESUME
    if not root.is_dir():
        return []
    return sorted(int(m[1]) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir())


def latest(run_dir: Path, warn: Any = None, only: Optional[int] = None) -> Optional[Resumable]:
    """The newest state whose files match their recorded hashes; a damaged one is skipped (and
    ``warn(message)`` told why), so the one before it is used. ``only``: that step's state or None
    (the other ranks of a multi-process run load the state rank 0 chose)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for step in reversed(states(run_dir)):
        if only is not None and step != only:
            continue
        path = Path(run_dir) / RESUME / f"step_{step:08d}"
        try:
            info = json.loads((path / "state.json").read_text())
            if info.get("format") != FORMAT or info.get("step") != step:
                raise ValueError("unknown format or step")
            for name, digest in info["sha256"].items():
                if file_sha256(path / name) != digest:
                    raise ValueError(f"{name} does not match its sha256")
            tensors = load_file(str(path / "train.safetensors"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
            if warn:
                warn(f"{path}: damaged resumable state ignored ({exc})")
            continue
        return Resumable(path, step, info, tensors)
    return None


def remove(run_dir: Path) -> None:
    """Drop every state (a run that finished, or one restarted from scratch)."""
    shutil.rmtree(Path(run_dir) / RESUME, ignore_errors=True)


def restore(found: Resumable, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generators: dict) -> None:
    """Put the weights, optimizer moments and RNG states of ``found`` back in place."""
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    load_model(model, str(found.path / "model.safetensors"), device=str(device))
    state = optimizer.state_dict()
    restored: dict = {}
    for key, value in found.tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            restored.setdefault(int(index), {})[name] = value  # load_state_dict moves them to the params' device
    state["state"] = restored
    optimizer.load_state_dict(state)
    for name, gen in generators.items():  # a stream the state lacks (saved on another device) starts fresh
        if f"rng.{name}" in found.tensors:
            gen.set_state(found.tensors[f"rng.{name}"])
