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
RESUME = "resume"  #: resumable states, one folder per saved step (gptlab.train.resume)
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


#: the largest JSON or YAML file gptlab reads back (summary.json, experiment.json, jobs.json, config.yaml,
#: tokenizer.json): what it writes is kilobytes, so a larger file is damaged or hostile, never parsed
MAX_READ_BYTES = 64 << 20
#: metrics.jsonl: at most this many bytes, this many rows and this long a row (one row per log step
#: is about 150 bytes; a million rows is a million log steps)
MAX_METRICS_BYTES = 256 << 20
MAX_METRICS_ROWS = 1_000_000
MAX_METRICS_LINE = 1 << 20
#: nesting deeper than this in a file read back is not what gptlab writes (and would exhaust the stack)
MAX_DEPTH = 64


def _size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def _damaged(path: Path, reason: str) -> Exception:
    from .errors import DamagedFile

    return DamagedFile(path, reason)


def open_regular(path: Path, limit: int) -> int:
    """A read-only descriptor of ``path``, which must be a regular file of at most ``limit`` bytes.

    A link to /dev/zero, a FIFO or a device is refused before it is opened (and again on the
    open descriptor, so a swap in between is caught too); the open never blocks. A missing file
    raises FileNotFoundError; anything else that makes it unreadable is DamagedFile naming it.
    """
    import stat

    path = Path(path)

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise _damaged(path, "is not a regular file")
        if st.st_size > limit:
            raise _damaged(path, f"is larger than {_size_text(limit)}, the most gptlab reads back")

    try:
        check(os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.lexists(path):  # a dangling link
            raise _damaged(path, "is a symbolic link to nothing") from None
        raise
    except OSError as exc:
        raise _damaged(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        check(os.fstat(fd))  # the file opened is the file checked
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: Path, limit: Optional[int] = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (at most limit + 1 are ever read, so a
    file that grows while it is read is refused too); ``limit`` defaults to MAX_READ_BYTES. Errors
    as open_regular."""
    limit = MAX_READ_BYTES if limit is None else limit
    fd = open_regular(path, limit)
    chunks, total = [], 0
    try:
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise _damaged(Path(path), f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if total > limit:
        raise _damaged(Path(path), f"is larger than {_size_text(limit)}, the most gptlab reads back")
    return b"".join(chunks)


def too_deep(data: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and mappings in ``data`` nest deeper than ``limit`` (checked without recursion)."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


_KIND = {dict: "a JSON object", list: "a JSON list"}


def load_json(path: Path, expect: type = dict, limit: Optional[int] = None) -> Any:
    """The parsed contents of a JSON file gptlab reads back, which must be of type ``expect``.

    Strict: a missing file raises FileNotFoundError; a file that is too large, not a regular file,
    not UTF-8 JSON, nested beyond reason or of another type raises DamagedFile naming it.
    """
    path = Path(path)
    raw = read_bounded(path, limit)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _damaged(path, "is not valid JSON") from None
    if not isinstance(data, expect):
        raise _damaged(path, f"is not {_KIND.get(expect, expect.__name__)}")
    if too_deep(data):
        raise _damaged(path, f"nests deeper than {MAX_DEPTH} levels")
    return data


def expanded_size(data: Any) -> int:
    """How many values ``data`` holds once every shared list or mapping (a YAML alias) is copied
    out, as OmegaConf or printing would: counted once per distinct object, so it is quick even
    when the answer is astronomical."""
    sizes: dict[int, int] = {}
    stack = [(data, False)]
    while stack:
        value, done = stack.pop()
        if not isinstance(value, (dict, list)) or (id(value) in sizes and not done):
            continue
        children = list(value.values()) if isinstance(value, dict) else value
        if done:
            sizes[id(value)] = 1 + sum(sizes.get(id(c), 1) if isinstance(c, (dict, list)) else 1 for c in children)
        else:
            sizes[id(value)] = 1  # a placeholder: a cycle counts once
            stack.append((value, True))
            stack.extend((c, False) for c in children if isinstance(c, (dict, list)))
    return sizes.get(id(data), 1)


#: a YAML file whose aliases expand to more values than this is refused (an experiment file is hundreds)
MAX_YAML_VALUES = 1_000_000


def load_yaml(path: Path, expect: type = dict, limit: Optional[int] = None, aliases: bool = False) -> Any:
    """A YAML file gptlab reads back, as plain data of type ``expect`` (errors as load_json).

    Plain YAML: nothing in it is evaluated (no ``${oc.env:...}`` interpolation, no tags beyond
    plain data). Aliases (``*name``) are refused before anything is built: gptlab never writes
    them, and a few lines of nested aliases (a "billion laughs") expand to more data than any
    machine holds once the result is copied, flattened or printed. With ``aliases`` (a file a
    person wrote, such as an experiment), they are allowed as long as the data they expand to
    holds at most MAX_YAML_VALUES values.
    """
    import yaml

    path = Path(path)
    raw = read_bounded(path, limit)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    alias = None
    try:
        text = raw.decode("utf-8")
        for event in () if aliases else yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                alias = str(event.anchor)[:40]
                break
        else:
            data = yaml.load(text, Loader=loader)
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError, TypeError):
        raise _damaged(path, "is not valid YAML") from None
    if alias is not None:
        raise _damaged(path, f"uses a YAML alias (*{alias}), which gptlab never writes")
    if aliases and expanded_size(data) > MAX_YAML_VALUES:
        raise _damaged(path, f"expands (through YAML aliases) to more than {MAX_YAML_VALUES:,} values")
    if not isinstance(data, expect):
        raise _damaged(path, "is not a YAML mapping" if expect is dict else f"is not {expect.__name__}")
    if too_deep(data):
        raise _damaged(path, f"nests deeper than {MAX_DEPTH} levels")
    return data


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
                     "base": dict, "defined": dict}


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
            raise _damaged(path, problem)
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
                raise _damaged(path, f"is larger than {_size_text(MAX_METRICS_BYTES)}, the most gptlab reads back")
            if not line.endswith(b"\n"):
                if len(line) > MAX_METRICS_LINE:
                    raise _damaged(path, f"line {number + 1} is longer than {_size_text(MAX_METRICS_LINE)}")
                return  # cut short by a kill
            number += 1
            if number > MAX_METRICS_ROWS:
                raise _damaged(path, f"holds more than {MAX_METRICS_ROWS:,} rows")
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


def refuse_link(path: Path) -> None:
    """Writing through a link someone planted could overwrite any file: refuse, naming it."""
    if Path(path).is_symlink():
        from .errors import ConfigError

        raise ConfigError(f"{path} is a symbolic link gptlab did not create; remove it (gptlab never writes "
                          f"through links or outside --results-dir)")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that a kill leaves the old file or the new one, never through a link; on
    an error (OSError) no temporary file is left behind."""
    path = Path(path)
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()  # a stale one, or a link someone planted: the link goes, not its target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


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
