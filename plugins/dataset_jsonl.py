"""Dataset 'jsonl': JSON Lines files, one document per line, read with the standard library alone.

Each non-empty line is a JSON object and its ``text_field`` (default ``text``) the document, a
string. ``path`` is a file, a folder (its ``.jsonl``, ``.jsonl.gz`` and ``.json.gz`` files, in
sorted order, subfolders included) or a glob, or a list of them; gzip-compressed files are
recognised by their first bytes, whatever their name. ``val_path``, when set, names the source's
own validation documents, and ``path`` is then training only. Files are read a line at a time in
large binary blocks: memory holds one line, never a file.

A line that cannot be a document (not JSON, not an object, no such field, a field that is not a
string) stops the run with one line naming the file and line. The first document is checked when
the dataset is built, so a wrong ``text_field`` is reported before anything is tokenized.
"""
import glob
import gzip
import json
import os
import zlib
from typing import Iterator, Optional, Union

import gptlab
from gptlab import ConfigError, Corpus
from gptlab.errors import did_you_mean, one_line

#: what a folder contributes: the names ending so (hidden files are left out)
SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
GZIP_MAGIC = b"\x1f\x8b"
BLOCK = 1 << 20  #: bytes read from a file at a time
#: JSON types in a message, by the Python type json.loads gives
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _expand(patterns, key: str) -> list:
    """The files a path option names: each pattern resolved from the experiment's folder."""
    files = []
    for pattern in patterns if isinstance(patterns, (list, tuple)) else [patterns]:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{key} must be a path, a folder or a glob (or a list of them), got {pattern!r}; "
                              f"fix {key}")
        where = gptlab.data_path(pattern, key=key)
        shown = os.path.abspath(where)
        if os.path.isdir(where):
            matches = sorted(p for p in glob.glob(os.path.join(glob.escape(where), "**", "*"), recursive=True)
                             if p.endswith(SUFFIXES) and not os.path.basename(p).startswith(".")
                             and os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{key.rsplit('.', 1)[-1]} '{pattern}' is a folder with no "
                                  f"{', '.join(SUFFIXES)} file (looked in {shown}); fix {key}")
        else:
            matches = sorted(p for p in glob.glob(where, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{key.rsplit('.', 1)[-1]} '{pattern}' matches no file (looked for {shown}; "
                                  f"relative paths start at the experiment file's folder); fix {key}")
        files.extend(matches)
    return files



def _open(name: str) -> tuple:
    """(the file's lines as a binary file object, decompressed when it is gzip; the file itself)."""
    raw = open(name, "rb", buffering=BLOCK)
    if raw.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # closing a GzipFile leaves raw open
    return raw, raw


def _problem(obj, text_field: str) -> str:
    """Why a parsed line is not a document (the caller found it so)."""
    if not isinstance(obj, dict):
        return f"is {JSON_TYPES.get(type(obj), type(obj).__name__)}, not a JSON object; each line must be an " \
               f"object such as {{\"{text_field}\": \"...\"}}"
    if text_field not in obj:
        fields = ", ".join(map(str, list(obj)[:12])) or "none"
        return f"has no field '{text_field}'{did_you_mean(text_field, obj)} (its fields: {fields}); " \
               f"set data.dataset.text_field"
    value = obj[text_field]
    return f"has field '{text_field}' holding {JSON_TYPES.get(type(value), type(value).__name__)}, not a string; " \
           f"set data.dataset.text_field to the field that holds the text"


def _lines(files: list, text_field: str, key: str) -> Iterator[tuple]:
    """(document, file, line number) for every non-empty line, in file order; a bad line raises
    ConfigError (message without the dataset's name: the caller adds it where it is needed)."""
    loads = json.loads
    for name in files:
        fh, raw = _open(name)
        number = 0
        try:
            for number, line in enumerate(fh, 1):
                try:
                    doc = loads(line)[text_field]
                except (ValueError, TypeError, KeyError, IndexError) as exc:  # the slow path: say what is wrong
                    if not line.strip():
                        continue  # an empty line (the common case costs no test)
                    if isinstance(exc, ValueError):  # JSONDecodeError, UnicodeDecodeError
                        raise ConfigError(f"{name}:{number} (data.dataset.{key}) is not JSON "
                                          f"({one_line(exc, 120)}); fix or remove that line") from None
                    raise ConfigError(f"{name}:{number} (data.dataset.{key}) {_problem(loads(line), text_field)}") \
                        from None
                if type(doc) is not str:
                    raise ConfigError(f"{name}:{number} (data.dataset.{key}) "
                                      f"{_problem({text_field: doc}, text_field)}")
                yield doc, name, number
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ConfigError(f"{name}:{number + 1} (data.dataset.{key}) cannot be decompressed, the gzip file is "
                              f"damaged or cut short ({one_line(exc, 80, kind=True)}); fix or replace it") from None
        finally:
            fh.close()
            raw.close()


def _documents(files: list, text_field: str, key: str):
    def documents() -> Iterator[str]:
        try:
            for doc, _, _ in _lines(files, text_field, key):
                yield doc
        except ConfigError as exc:  # raised while the corpus is read, outside the factory: name the dataset
            raise ConfigError(f"data.dataset 'jsonl': {exc}") from None

    return documents


def jsonl(path: Union[str, list], text_field: str = "text", val_path: Optional[Union[str, list]] = None):
    """JSON Lines files (a path, a folder or a glob, or a list; .jsonl, gzip too): each line an object
    whose text_field is a document. val_path: the source's own validation files (path is then training)."""
    if not text_field:
        raise ConfigError(f"text_field must name a field of each line's object, got {text_field!r}; "
                          f"fix data.dataset.text_field")
    train = _expand(path, "data.dataset.path")
    val = _expand(val_path, "data.dataset.val_path") if val_path is not None else None
    for files, key in ((train, "path"), (val, "val_path")):
        if files:  # check the first document now: a wrong text_field fails before tokenizing starts
            first = _lines(files, text_field, key)
            try:
                next(first, None)
            finally:
                first.close()
    fingerprint = f"jsonl;text_field={text_field};train={gptlab.file_stamp(train)}"
    if val is not None:
        fingerprint += f";val={gptlab.file_stamp(val)}"
    return Corpus(fingerprint=fingerprint, documents=_documents(train, text_field, "path"),
                  val_documents=_documents(val, text_field, "val_path") if val is not None else None)


@gptlab.hookimpl
def gptlab_register(register):
    register("dataset", "jsonl", jsonl)
