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
        resume/        resumable states while the run is unfinished (gptlab.train.resume)
        .lock          flock'ed while a process trains the run
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

# the generic readers and writers, used here and, through this module, by the rest of gptlab
from .files import (MAX_DEPTH, MAX_READ_BYTES, damaged, expanded_size, file_sha256, load_json,  # noqa: F401
                    load_yaml, open_no_follow, open_regular, read_bounded, refuse_link, size_text, too_deep,
                    write_bytes_atomic, write_json_atomic, write_text_atomic)

EXPERIMENT = "experiment.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ERROR = "error.txt"
MODEL = "model.safetensors"
TOKENIZER = "tokenizer.json"
LOCK = ".lock"
RESUME = "resume"  #: resumable states, one folder per saved step (gptlab.train.resume)
#: files a rerun of the run replaces (config.yaml and summary.json are overwritten atomically instead)
OUTPUTS = (METRICS, ERROR, MODEL, TOKENIZER)

RUNNING, COMPLETED, DIVERGED, FAILED, INTERRUPTED = "running", "completed", "diverged", "failed", "interrupted"
STATUSES = (COMPLETED, DIVERGED, FAILED, INTERRUPTED, RUNNING)
#: results: skipped on rerun unless --force
FINISHED = (COMPLETED, DIVERGED)

#: numbers summary.json holds for a finished run, besides ``val_loss@Nx`` for each train.eval_lengths
SUMMARY_METRICS = ("final_val_loss", "final_val_bpb", "final_train_loss", "best_val_loss", "best_val_step", "tokens", "tokens_per_s",
                   "train_time_s", "mfu", "flops_per_token", "parameters", "memory_estimate", "peak_memory",
                   "wall_time_s")
#: short names tables accept for summary metrics
METRIC_ALIASES = {"val_loss": "final_val_loss", "val_bpb": "final_val_bpb", "train_loss": "final_train_loss"}

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


def run_key(config_hash: str, seed: int) -> str:
    """One run of a config, as a definition names it when a config's seeds play different roles
    (a ``tune:`` block's tuning seeds beside its comparison seeds): ``<hash>:s<seed>``."""
    return f"{config_hash}:s{seed}"


#: a definition's mark on a tuning run's key (``TUNING + run_key(...)``): the file defines the run,
#: but as a means of choosing a value, not as a row of the comparison
TUNING = "tune:"


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


#: metrics.jsonl: at most this many bytes, this many rows and this long a row (one row per log step
#: is about 150 bytes; a million rows is a million log steps)
MAX_METRICS_BYTES = 256 << 20
MAX_METRICS_ROWS = 1_000_000
MAX_METRICS_LINE = 1 << 20


def read_json(path: Path) -> Optional[dict]:
    """A JSON object from ``path``, or None when it is missing, unreadable, damaged (see load_json)
    or not an object."""
    from .errors import DamagedFile

    try:
        return load_json(path, dict)
    except (OSError, DamagedFile):
        return None


def read_summary(run_dir: Path) -> Optional[dict]:
    return read_json(Path(run_dir) / SUMMARY)


#: experiment.json: the type of each key gptlab writes there
_EXPERIMENT_TYPES = {"name": str, "description": str, "source": str, "variants": list, "compare": dict,
                     "base": dict, "defined": dict, "tuning": dict, "scale": dict}


def experiment_damage(meta: Any) -> Optional[str]:
    """Why the contents of an experiment.json are not what gptlab writes, or None."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    for key, kind in _EXPERIMENT_TYPES.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            return f"holds {key} as {_type_name(meta[key])}, not {_TYPE_WORDS[kind]}"
    if any(not isinstance(v, str) for v in meta.get("variants") or []):
        return "holds a variant name that is not text"
    if any(not isinstance(v, str) for v in (meta.get("defined") or {}).values()):
        return "holds a defined config whose variant is not text"
    compare = meta.get("compare") or {}
    for key in ("metric", "sort"):
        if compare.get(key) is not None and not isinstance(compare[key], str):
            return f"holds compare.{key} as {_type_name(compare[key])}, not text"
    if isinstance(compare.get("baseline"), (dict, list)):
        return f"holds compare.baseline as {_type_name(compare['baseline'])}, not a row name"
    by = compare.get("by")
    if by is not None and not isinstance(by, str) and not (isinstance(by, list)
                                                           and all(isinstance(k, str) for k in by)):
        return f"holds compare.by as {_type_name(by)}, not config keys"
    return None


def read_experiment(exp_dir: Path, warn: bool = False) -> dict:
    """experiment.json (name, base config, variants in declaration order, compare block), or {}
    when it is missing or damaged (``warn``: then say so in one line on stderr, naming it)."""
    import sys

    from .errors import DamagedFile

    path = Path(exp_dir) / EXPERIMENT
    try:
        meta = load_json(path, dict)
        problem = experiment_damage(meta)
        if problem:
            raise damaged(path, problem)
    except FileNotFoundError:
        return {}
    except (OSError, DamagedFile) as exc:
        if warn:
            sys.stderr.write(f"gptlab: warning: ignoring {exc}\n")
        return {}
    return meta


def read_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain data, or {} when it is missing, unreadable or damaged.

    Read with a plain YAML loader (load_yaml): nothing in it is evaluated (no ``${oc.env:...}``
    interpolation), so a planted file cannot make gptlab print an environment variable, and no
    alias is expanded.
    """
    from .errors import DamagedFile

    try:
        return load_yaml(Path(run_dir) / CONFIG, dict)
    except (OSError, DamagedFile):  # a damaged file must not hide the other runs
        return {}


_TYPE_WORDS = {str: "text", int: "an integer", dict: "a mapping", list: "a list", float: "a number"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _TYPE_WORDS.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _identity_problem(data: dict, file: str) -> Optional[str]:
    """The first key that says which run this is (experiment, variant, config_hash, seed, overrides)
    held as the wrong type: tables would group, label or count the run wrongly."""
    for key in ("experiment", "variant", "config_hash"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{file} holds {key} as {_type_name(data[key])}, not text"
    if data.get("seed") is not None and not _is_int(data["seed"]):
        return f"{file} holds seed as {_type_name(data['seed'])}, not an integer"
    overrides = data.get("overrides")
    if overrides is not None and not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        return f"{file} holds overrides as {_type_name(overrides)}, not a list of text"
    return None


def summary_damage(summary: dict) -> Optional[str]:
    """Why a parsed summary.json cannot be trusted (a status, seed, variant ... of the wrong type),
    or None. Such a run is skipped with a warning: it would be counted or grouped wrongly."""
    status = summary.get("status")
    if status is not None and status not in STATUSES:
        shown = repr(status) if isinstance(status, str) else _type_name(status)
        return f"{SUMMARY} holds status {shown[:40]}, not one of {', '.join(STATUSES)}"
    return _identity_problem(summary, SUMMARY)


def summary_oddities(summary: dict) -> list[str]:
    """The summary numbers held as something else (text where a loss belongs): each is shown as
    n/a, and the caller warns so the n/a is not silent."""
    odd = []
    for key, value in summary.items():
        if (key in SUMMARY_METRICS or length_multiple(key) is not None or key in ("step", "diverged_step")) \
                and value is not None and not _is_number(value):
            shown = repr(value) if isinstance(value, str) else _type_name(value)
            odd.append(f"{key} is {shown[:40]}, not a number")
    return odd


def config_damage(config: dict) -> Optional[str]:
    """Why a parsed config.yaml is not what gptlab writes, or None."""
    if any(not isinstance(config.get(s, {}), dict) for s in ("model", "data", "train")):
        return f"{CONFIG} is not a mapping of model, data and train"
    return _identity_problem(config, CONFIG)


def _metric_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(number, line) for every complete line of metrics.jsonl (a last line a kill cut short is left
    out), bounded: a file that is not regular, larger than MAX_METRICS_BYTES, holds more than
    MAX_METRICS_ROWS rows or a line longer than MAX_METRICS_LINE raises DamagedFile."""
    fd = open_regular(path, MAX_METRICS_BYTES)
    with os.fdopen(fd, "rb") as fh:
        number = read = 0
        while True:
            line = fh.readline(MAX_METRICS_LINE + 1)
            if not line:
                return
            read += len(line)
            if read > MAX_METRICS_BYTES:
                raise damaged(path, f"is larger than {size_text(MAX_METRICS_BYTES)}, the most gptlab reads back")
            if not line.endswith(b"\n"):
                if len(line) > MAX_METRICS_LINE:
                    raise damaged(path, f"line {number + 1} is longer than {size_text(MAX_METRICS_LINE)}")
                return  # cut short by a kill
            number += 1
            if number > MAX_METRICS_ROWS:
                raise damaged(path, f"holds more than {MAX_METRICS_ROWS:,} rows")
            yield number, line


_METRIC_NUMBERS = ("step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s")


def _metric_row(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def damage(run_dir: Path) -> Optional[str]:
    """Why a run directory cannot be trusted, or None: a summary.json or config.yaml that is not
    what gptlab writes (too large, not a regular file, not parseable, aliases, the wrong types),
    or a metrics row that is not a JSON object of numbers (the last line of a killed run may be
    cut short; that is not damage)."""
    from .errors import DamagedFile

    run_dir = Path(run_dir)
    try:
        summary = load_json(run_dir / SUMMARY, dict)
    except FileNotFoundError:
        pass
    except DamagedFile as exc:
        return f"{SUMMARY} {exc.reason}"
    else:
        problem = summary_damage(summary)
        if problem:
            return problem
    try:
        config = load_yaml(run_dir / CONFIG, dict)
    except FileNotFoundError:
        pass
    except DamagedFile as exc:
        return f"{CONFIG} is not a mapping of model, data and train" if exc.reason == "is not a YAML mapping" \
            else f"{CONFIG} {exc.reason}"
    else:
        problem = config_damage(config)
        if problem:
            return problem
    try:
        for number, line in _metric_lines(run_dir / METRICS):
            row = _metric_row(line)
            if row is None:
                return f"{METRICS} line {number} is not JSON"
            if not isinstance(row, dict) or too_deep(row) or any(
                    k in row and row[k] is not None and not _is_number(row[k]) for k in _METRIC_NUMBERS):
                return f"{METRICS} line {number} is not a row of numbers"
    except FileNotFoundError:
        return None
    except DamagedFile as exc:
        return f"{METRICS} {exc.reason}"
    return None


def row_steps(run_dir: Path, count: int) -> list:
    """The ``step`` of each of the first ``count`` complete rows of metrics.jsonl (None for a row
    without an integer step); fewer when the file holds fewer. Bounded as metric_rows; a damaged
    file raises DamagedFile, a missing one gives []."""
    steps: list = []
    try:
        for _, line in _metric_lines(Path(run_dir) / METRICS):
            if len(steps) >= count:
                break
            row = _metric_row(line)
            step = row.get("step") if isinstance(row, dict) else None
            steps.append(step if _is_int(step) else None)
    except FileNotFoundError:
        pass
    return steps


def metric_rows(run_dir: Path) -> Iterator[dict]:
    """The rows of metrics.jsonl; a line cut short by a kill, or that is not a JSON object, is
    skipped. Bounded as damage() checks it: past a bound (or for a file that is not regular) the
    rows stop, so a planted file cannot exhaust memory."""
    from .errors import DamagedFile

    try:
        for _, line in _metric_lines(Path(run_dir) / METRICS):
            row = _metric_row(line)
            if isinstance(row, dict):
                yield row
    except (OSError, DamagedFile):
        return


def clean_stale_temporaries(directory: Path) -> None:
    """Remove the ``.NAME.tmpPID`` files a killed writer left behind (never following links)."""
    for stale in Path(directory).glob(".*.tmp*"):
        if stale.is_symlink() or stale.is_file():
            stale.unlink(missing_ok=True)


def remove_orphaned_temporaries(directory: Path) -> list[Path]:
    """Remove the ``.NAME.tmpPID`` files and folders in ``directory`` whose writer is no longer a
    process on this machine (a crash mid-write: a token cache or its shards, experiment.json, a
    summary under --force); a live writer's are left alone. Links are removed, never followed.
    Returns what was removed."""
    removed = []
    try:
        candidates = list(Path(directory).glob(".*.tmp*"))
    except OSError:
        return removed
    for stale in candidates:
        m = re.search(r"\.tmp(\d+)$", stale.name)
        if not m or _alive(int(m.group(1))):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)  # rmtree removes links inside, never follows them
        elif stale.is_symlink() or stale.is_file():
            stale.unlink(missing_ok=True)
        else:
            continue
        removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number no process has: leave its file
    return pid > 0


def keep_metric_rows(run_dir: Path, n: int) -> None:
    """Cut metrics.jsonl back to its first ``n`` complete rows (the ones a resumable state saw),
    atomically, so a resumed run neither repeats nor skips a step."""
    path = Path(run_dir) / METRICS
    refuse_link(path)
    kept = []
    try:
        for number, line in _metric_lines(path):
            if number > n:
                break
            kept.append(line.decode("utf-8", errors="replace"))
    except FileNotFoundError:
        pass
    write_text_atomic(path, "".join(kept))


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
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
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
