"""The resumable state of a run: everything needed to continue training exactly where it stopped.

A state is a folder ``resume/step_00000500/`` in the run directory holding
  model.safetensors   the weights (shared tensors such as a tied head stored once)
  train.safetensors   AdamW's moments and step counts, every RNG state (torch's global generator,
                      CUDA's, the batch sampler's), as tensors
  state.json          the step, the loop's counters and running losses, the number of metrics.jsonl
                      rows written so far, elapsed times, and the sha256 of both tensor files
Nothing needs pickle to read. A state is written under a temporary name and renamed into place,
so a kill mid-write leaves the previous state usable; a state whose files do not match the
hashes in its state.json is never used, and neither is one whose state.json is not what gptlab
writes: a step beyond the run, counters missing or of the wrong type, a row count that disagrees
with metrics.jsonl, tensors that do not fit the model (``check``, ``check_fits``). A ``resume``
folder or step folder that is a symbolic link is refused, never followed. One process writes
(rank 0 of a multi-process run); any process can read.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import rundir as rd
from ..rundir import RESUME, file_sha256

_STEP = re.compile(r"^step_(\d{8})$")
FORMAT = 1


@dataclass
class Resumable:
    """A state read back: where to continue from."""

    path: Path
    step: int
    info: dict  # state.json
    tensors: dict  # train.safetensors


class UnusableState(ValueError):
    """A resumable state that cannot be trusted (the message says why)."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: the training loop's counters a state carries (gptlab.train.loop.TrainState): field -> (check, what it must be)
#: counters added after states existed: a state without them is still whole (they start empty)
LATER_COUNTERS = {"last_val_bpb"}

COUNTERS = {
    "step": (lambda v: _int(v) and v >= 0, "a whole number >= 0"),
    "tokens": (lambda v: _int(v) and v >= 0, "a whole number >= 0"),
    "best_val": (lambda v: v is None or _number(v), "null or a finite number"),
    "best_val_step": (lambda v: v is None or (_int(v) and v >= 0), "null or a whole number >= 0"),
    "last_val": (lambda v: v is None or _number(v), "null or a finite number"),
    "last_train": (lambda v: v is None or _number(v), "null or a finite number"),
    "last_val_bpb": (lambda v: v is None or _number(v), "null or a finite number"),
    "train_time": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "checkpoint_time": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "timed_tokens": (lambda v: _int(v) and v >= 0, "a whole number >= 0"),
    "init_grad_norms": (lambda v: v is None or (isinstance(v, list) and all(_number(x) for x in v)),
                        "null or a list of finite numbers"),
}


def check(info: Any, step: int, run_dir: Path, steps: Optional[int] = None,
          tokens_per_step: Optional[int] = None) -> None:
    """Raise UnusableState unless ``info`` (a state.json) is what gptlab writes for the state after
    ``step`` of a run of ``steps`` steps taking ``tokens_per_step`` tokens each, and agrees with the
    run's metrics.jsonl: at least ``metrics_rows`` complete rows, the last of them at or before
    ``step`` and the next (if any) after it."""
    def bad(reason: str) -> UnusableState:
        return UnusableState(reason)

    if not isinstance(info, dict):
        raise bad("state.json is not a JSON object")
    if info.get("format") != FORMAT:
        raise bad(f"unknown format {info.get('format')!r}")
    if info.get("step") != step or not _int(info.get("step")):
        raise bad(f"its step {info.get('step')!r} is not the {step} its folder is named for")
    if steps is not None and step > steps:
        raise bad(f"step {step} is beyond this run's {steps} steps")
    digests = info.get("sha256")
    if not isinstance(digests, dict) or set(digests) != {"model.safetensors", "train.safetensors"} \
            or not all(isinstance(d, str) for d in digests.values()):
        raise bad("sha256 is not a digest of model.safetensors and train.safetensors")
    rows = info.get("metrics_rows")
    if not _int(rows) or not 0 <= rows <= rd.MAX_METRICS_ROWS:
        raise bad(f"metrics_rows {rows!r} is not a row count (a whole number from 0 to {rd.MAX_METRICS_ROWS:,})")
    wall = info.get("wall_time_s")
    if not _number(wall) or wall < 0:
        raise bad(f"wall_time_s {wall!r} is not a finite number >= 0")
    if "device_type" in info and not isinstance(info["device_type"], str):
        raise bad(f"device_type {info['device_type']!r} is not a device name")
    loop = info.get("loop")
    if not isinstance(loop, dict) or not isinstance(loop.get("state"), dict):
        raise bad("the loop's counters (loop.state) are missing")
    counters = loop["state"]
    missing = sorted(set(COUNTERS) - set(counters) - LATER_COUNTERS)
    if missing:
        raise bad(f"the loop's counters lack {', '.join(missing)}")
    unknown = sorted(set(counters) - set(COUNTERS))
    if unknown:
        raise bad(f"the loop's counters hold unknown {', '.join(map(str, unknown))}")
    for name, (ok, what) in COUNTERS.items():
        if name in counters and not ok(counters[name]):
            raise bad(f"loop.state.{name} {counters[name]!r} is not {what}")
    if not _number(loop.get("loss_sum")):
        raise bad(f"loop.loss_sum {loop.get('loss_sum')!r} is not a finite number")
    aux = loop.get("aux_sum", {})
    if not isinstance(aux, dict) or not all(isinstance(k, str) and _number(v) for k, v in aux.items()):
        raise bad(f"loop.aux_sum {aux!r} is not a mapping of names to finite numbers")
    if not _int(loop.get("loss_count")) or loop["loss_count"] < 0:
        raise bad(f"loop.loss_count {loop.get('loss_count')!r} is not a whole number >= 0")
    if counters["step"] != step:
        raise bad(f"loop.state.step {counters['step']} is not the state's step {step}")
    if tokens_per_step is not None and counters["tokens"] != step * tokens_per_step:
        raise bad(f"loop.state.tokens {counters['tokens']} is not {step} steps of {tokens_per_step} tokens")
    if counters["timed_tokens"] > counters["tokens"]:
        raise bad(f"loop.state.timed_tokens {counters['timed_tokens']} exceeds tokens {counters['tokens']}")
    if counters["best_val_step"] is not None and counters["best_val_step"] > step:
        raise bad(f"loop.state.best_val_step {counters['best_val_step']} is after the state's step {step}")
    _check_rows(run_dir, rows, step)


def _check_rows(run_dir: Path, rows: int, step: int) -> None:
    from ..errors import DamagedFile

    try:
        seen = rd.row_steps(run_dir, rows + 1)
    except DamagedFile as exc:
        raise UnusableState(f"{rd.METRICS} {exc.reason}") from None
    if len(seen) < rows:
        raise UnusableState(f"it saw {rows} rows of {rd.METRICS}, which holds {len(seen)}")
    if rows and (seen[rows - 1] is None or seen[rows - 1] > step):
        raise UnusableState(f"row {rows} of {rd.METRICS} is not a row logged at or before step {step}")
    if len(seen) > rows and (seen[rows] is None or seen[rows] <= step):
        raise UnusableState(f"row {rows + 1} of {rd.METRICS} was logged at or before step {step} but the "
                            f"state saw only {rows} rows")


def check_fits(found: "Resumable", model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise UnusableState unless the tensors of ``found`` fit ``model`` (any device, meta
    included) and its ``optimizer``: every stored weight names a tensor of the model with its
    shape, and every model tensor is stored (a tied alias once); optimizer moments match their
    parameter's shape; RNG states are states of torch's generators."""
    from safetensors import safe_open

    named = model.state_dict(keep_vars=True)
    with safe_open(str(found.path / "model.safetensors"), framework="pt", device="cpu") as fh:
        stored = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    covered = set()
    for key, shape in stored.items():
        if key not in named:
            raise UnusableState(f"model.safetensors holds {key}, which this model does not have")
        if shape != tuple(named[key].shape):
            raise UnusableState(f"model.safetensors holds {key} of shape {list(shape)}, this model's is "
                                f"{list(named[key].shape)}")
        covered.add(id(named[key]))
    absent = [k for k, t in named.items() if id(t) not in covered]
    if absent:
        raise UnusableState(f"model.safetensors lacks {absent[0]}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cpu_state = torch.Generator().get_state()
    for key, value in found.tensors.items():
        parts = key.split(".", 2)
        if parts[0] == "optim" and len(parts) == 3:
            if not parts[1].isdigit() or int(parts[1]) >= len(params):
                raise UnusableState(f"train.safetensors holds {key}, which names no parameter")
            want = () if parts[2] == "step" else tuple(params[int(parts[1])].shape)
            if tuple(value.shape) != want:
                raise UnusableState(f"train.safetensors holds {key} of shape {list(value.shape)}, not {list(want)}")
        elif key in ("rng.torch", "rng.batches"):
            if value.dtype != cpu_state.dtype or value.shape != cpu_state.shape:
                raise UnusableState(f"train.safetensors holds {key}, which is not a CPU generator's state")
        elif key == "rng.cuda":
            if value.dtype != torch.uint8 or value.dim() != 1:
                raise UnusableState(f"train.safetensors holds {key}, which is not a CUDA generator's state")
        else:
            raise UnusableState(f"train.safetensors holds {key}, which a state does not have")


def _root(run_dir: Path) -> Path:
    """The run's resume folder, refused (ConfigError naming it) when someone planted a link there."""
    root = Path(run_dir) / RESUME
    rd.refuse_link(root)
    return root


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

    root = _root(run_dir)
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
    rd.refuse_link(final)
    if final.exists():  # the same step saved before (a resumed run re-saving): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in sorted(states(run_dir))[:-max(1, keep)]:
        shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)
    return final


def states(run_dir: Path) -> list[int]:
    """Steps of the complete-looking states in ``run_dir`` (unverified), oldest first. A linked
    ``resume`` folder or step folder raises ConfigError naming it: gptlab never wrote it, and
    would delete through it."""
    root = _root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if _STEP.match(path.name):
            rd.refuse_link(path)
            if path.is_dir():
                found.append(int(path.name[5:]))
    return sorted(found)


def latest(run_dir: Path, warn: Any = None, only: Optional[int] = None, steps: Optional[int] = None,
           tokens_per_step: Optional[int] = None,
           fits: Optional[Callable[["Resumable"], None]] = None) -> Optional[Resumable]:
    """The newest state that passes ``check`` (for a run of ``steps`` steps of ``tokens_per_step``
    tokens), whose files match their recorded hashes and that ``fits`` (raising UnusableState
    otherwise) accepts; any other is skipped (and
    ``warn(message)`` told why), so the one before it is used. ``only``: that step's state or None
    (the other ranks of a multi-process run load the state rank 0 chose)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import DamagedFile

    for step in reversed(states(run_dir)):
        if only is not None and step != only:
            continue
        path = Path(run_dir) / RESUME / f"step_{step:08d}"
        try:
            info = rd.load_json(path / "state.json", dict)
            check(info, step, run_dir, steps, tokens_per_step)
            for name, digest in info["sha256"].items():
                os.close(rd.open_regular(path / name, 1 << 40))  # a regular file, never a link to a device
                if file_sha256(path / name) != digest:
                    raise UnusableState(f"{name} does not match its sha256")
            found = Resumable(path, step, info, load_file(str(path / "train.safetensors")))
            if fits is not None:
                fits(found)
        except (DamagedFile, OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
            if warn:
                warn(f"{path}: damaged resumable state ignored ({exc})")
            continue
        return found
    return None


def remove(run_dir: Path) -> None:
    """Drop every state (a run that finished, or one restarted from scratch); a linked ``resume``
    folder raises ConfigError, so nothing outside the run folder is deleted."""
    shutil.rmtree(_root(run_dir), ignore_errors=True)


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
