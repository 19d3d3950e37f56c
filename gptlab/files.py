"""Reading back and writing files safely, whatever folder they are in: bounded reads of regular
files only (never a link to /dev/zero, a FIFO or a device), JSON and YAML with their types checked
and no alias blow-up, and writes that a kill leaves whole and that never go through a link.
The run folder's own layout and readers are in gptlab.rundir."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


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
#: nesting deeper than this in a file read back is not what gptlab writes (and would exhaust the stack)
MAX_DEPTH = 64


def size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def damaged(path: Path, reason: str) -> Exception:
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
            raise damaged(path, "is not a regular file")
        if st.st_size > limit:
            raise damaged(path, f"is larger than {size_text(limit)}, the most gptlab reads back")

    try:
        check(os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.lexists(path):  # a dangling link
            raise damaged(path, "is a symbolic link to nothing") from None
        raise
    except OSError as exc:
        raise damaged(path, f"cannot be read ({exc.strerror or exc})") from None
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
        raise damaged(Path(path), f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if total > limit:
        raise damaged(Path(path), f"is larger than {size_text(limit)}, the most gptlab reads back")
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
        raise damaged(path, "is not valid JSON") from None
    if not isinstance(data, expect):
        raise damaged(path, f"is not {_KIND.get(expect, expect.__name__)}")
    if too_deep(data):
        raise damaged(path, f"nests deeper than {MAX_DEPTH} levels")
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
        raise damaged(path, "is not valid YAML") from None
    if alias is not None:
        raise damaged(path, f"uses a YAML alias (*{alias}), which gptlab never writes")
    if aliases and expanded_size(data) > MAX_YAML_VALUES:
        raise damaged(path, f"expands (through YAML aliases) to more than {MAX_YAML_VALUES:,} values")
    if not isinstance(data, expect):
        raise damaged(path, "is not a YAML mapping" if expect is dict else f"is not {expect.__name__}")
    if too_deep(data):
        raise damaged(path, f"nests deeper than {MAX_DEPTH} levels")
    return data


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a kill at any moment leaves either the old file or the new one."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
