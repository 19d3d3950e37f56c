"""The run directory format: file names, statuses and the few rules for reading and writing them.

Every module that touches ``results/`` goes through these names, so the format is written down
once. It imports neither torch nor pandas: the results commands read runs without either.

    results/<experiment>/
      experiment.json                      the experiment as resolved (base, variants, compare)
      <variant>__<config-hash>__s<seed>/   one run
        config.yaml    the resolved config (model, data, train) plus experiment, variant, seed, hash
        metrics.jsonl  one JSON row per log step
        summary.json   status and final numbers; replaced atomically
        error.txt      the traceback of a failed run
        model.safetensors, tokenizer.json  with train.checkpoint
        resume/        resumable states while the run is unfinished (gptlab.resume)
        .lock          flock'ed while a process trains the run
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

EXPERIMENT = "experiment.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ERROR = "error.txt"
MODEL = "model.safetensors"
TOKENIZER = "tokenizer.json"
LOCK = ".lock"
RESUME = "resume"  #: resumable states, one folder per saved step (gptlab.resume)
#: files a rerun of the run replaces (config.yaml and summary.json are overwritten atomically instead)
OUTPUTS = (METRICS, ERROR, MODEL, TOKENIZER)

RUNNING, COMPLETED, DIVERGED, FAILED, INTERRUPTED = "running", "completed", "diverged", "failed", "interrupted"
STATUSES = (COMPLETED, DIVERGED, FAILED, INTERRUPTED, RUNNING)
#: results: skipped on rerun unless --force
FINISHED = (COMPLETED, DIVERGED)

#: numbers summary.json holds for a finished run, besides ``val_loss@Nx`` for each train.eval_lengths
SUMMARY_METRICS = ("final_val_loss", "final_train_loss", "best_val_loss", "best_val_step", "tokens", "tokens_per_s",
                   "train_time_s", "mfu", "flops_per_token", "parameters", "memory_estimate", "peak_memory",
                   "wall_time_s")
#: short names tables accept for summary metrics
METRIC_ALIASES = {"val_loss": "final_val_loss", "train_loss": "final_train_loss"}

_LENGTH_KEY = re.compile(r"^val_loss@([0-9.eE+-]+)x$")


def length_key(multiple: float) -> str:
    """The summary key of the validation loss at ``multiple`` times the training length."""
    return f"val_loss@{multiple:g}x"


def length_multiple(key: str) -> Optional[float]:
    """The multiple in a ``val_loss@Nx`` key, or None for any other key."""
    m = _LENGTH_KEY.match(str(key))
    return float(m[1]) if m else None


def safe_name(label: str) -> str:
    """A variant label as a folder-name fragment."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip("_")[:80] or "run"


def run_dir_name(variant: str, config_hash: str, seed: int) -> str:
    return f"{safe_name(variant)}__{config_hash}__s{seed}"


def seed_from_name(name: str) -> Optional[int]:
    m = re.search(r"__s(-?\d+)$", name)
    return int(m[1]) if m else None


def find_run_dir(exp_dir: Path, config_hash: str, seed: int) -> Optional[Path]:
    """The directory of an earlier run with this config hash and seed, whatever its variant label."""
    if not Path(exp_dir).is_dir():
        return None
    matches = sorted(Path(exp_dir).glob(f"*__{config_hash}__s{seed}"))
    return matches[0] if matches else None


def is_run_dir(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file() or (Path(path) / CONFIG).is_file()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks (token caches and states can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Optional[dict]:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_summary(run_dir: Path) -> Optional[dict]:
    return read_json(Path(run_dir) / SUMMARY)


def read_experiment(exp_dir: Path) -> dict:
    """experiment.json (name, base config, variants in declaration order, compare block), or {}."""
    return read_json(Path(exp_dir) / EXPERIMENT) or {}


def read_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain data, or {} when it is missing or unreadable.

    Read with a plain YAML loader: nothing in it is evaluated (no ``${oc.env:...}``
    interpolation), so a planted file cannot make gptlab print an environment variable.
    """
    import yaml

    try:
        data = yaml.safe_load((Path(run_dir) / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # a damaged file must not hide the other runs
        return {}
    return data if isinstance(data, dict) else {}


def damage(run_dir: Path) -> Optional[str]:
    """Why a run directory cannot be trusted, or None: a summary.json or config.yaml that is not
    what gptlab writes, or a metrics row that is not a JSON object of numbers (the last line of a
    killed run may be cut short; that is not damage)."""
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).exists() and read_summary(run_dir) is None:
        return f"{SUMMARY} is not a JSON object"
    if (run_dir / CONFIG).exists():
        try:
            data = yaml.safe_load((run_dir / CONFIG).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return f"{CONFIG} is not valid YAML"
        if not isinstance(data, dict) or any(not isinstance(data.get(s, {}), dict) for s in ("model", "data", "train")):
            return f"{CONFIG} is not a mapping of model, data and train"
    try:
        lines = (run_dir / METRICS).read_bytes().split(b"\n")
    except OSError:
        return None
    for number, line in enumerate(lines[:-1], 1):  # every complete line
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{METRICS} line {number} is not JSON"
        if not isinstance(row, dict) or any(k in row and row[k] is not None and not isinstance(row[k], (int, float))
                                            for k in ("step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s")):
            return f"{METRICS} line {number} is not a row of numbers"
    return None


def metric_rows(run_dir: Path) -> Iterator[dict]:
    """The rows of metrics.jsonl; a line cut short by a kill is skipped."""
    try:
        fh = open(Path(run_dir) / METRICS, encoding="utf-8", errors="replace")
    except OSError:
        return
    with fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def refuse_link(path: Path) -> None:
    """Writing through a link someone planted could overwrite any file: refuse, naming it."""
    if Path(path).is_symlink():
        from .errors import ConfigError

        raise ConfigError(f"{path} is a symbolic link gptlab did not create; remove it (gptlab never writes "
                          f"through links or outside --results-dir)")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a kill leaves the old file or the new one, never through a link."""
    path = Path(path)
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()  # a stale one, or a link someone planted: the link goes, not its target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_no_follow(path: Path, mode: str = "a") -> Any:
    """Open for appending ('a') or for a lock ('lock', never truncated) without following a link."""
    path = Path(path)
    refuse_link(path)
    flags = os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_WRONLY | os.O_APPEND if mode == "a" else os.O_RDWR)
    return os.fdopen(os.open(path, flags, 0o644), "a" if mode == "a" else "r+")


def clean_stale_temporaries(directory: Path) -> None:
    """Remove the ``.NAME.tmpPID`` files a killed writer left behind (never following links)."""
    for stale in Path(directory).glob(".*.tmp*"):
        if stale.is_symlink() or stale.is_file():
            stale.unlink(missing_ok=True)


def keep_metric_rows(run_dir: Path, n: int) -> None:
    """Cut metrics.jsonl back to its first ``n`` complete rows (the ones a resumable state saw),
    atomically, so a resumed run neither repeats nor skips a step."""
    path = Path(run_dir) / METRICS
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if line.endswith("\n")][:n]
    write_text_atomic(path, "".join(kept))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a kill at any moment leaves either the old file or the new one."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def run_status(run_dir: Path, summary: Optional[dict]) -> str:
    """The recorded status, except that 'running' without a live lock holder is 'interrupted'.

    A killed process (OOM, SIGKILL, power loss) never gets to write its final status; the kernel
    drops its flock, so an unheld lock is the reliable sign that nobody is training the run.
    """
    status = (summary or {}).get("status")
    if status in (None, RUNNING):
        return RUNNING if lock_held(Path(run_dir)) else INTERRUPTED
    return str(status)


def lock_held(run_dir: Path) -> bool:
    """Whether another process holds the run's lock (tested without creating or changing anything)."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def finished_at(run_dir: Path, summary: Optional[dict]) -> float:
    """When a run last changed (epoch seconds): its summary's finish or start time, else the
    directory's mtime. The runner writes those times as local time without a zone."""
    import time

    for key in ("finished", "started"):
        stamp = (summary or {}).get(key)
        if isinstance(stamp, str):
            try:
                return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                pass
    try:
        return Path(run_dir).stat().st_mtime
    except OSError:
        return 0.0
