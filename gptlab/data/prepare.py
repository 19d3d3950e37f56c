"""Corpora of any size into sharded token files, with memory that does not grow with the corpus.

A documents corpus (``Corpus.documents``) is read as a stream. Chunks of documents go to worker
processes, which tokenize them, end each document with the tokenizer's end-of-text id and sort
it into training or validation by a hash of its text (so the split of a document never moves when
the corpus grows), unless the source brings its own split. The parent writes the results, in
corpus order whatever the number of workers, into shards of at most ``data.shard_tokens`` tokens
and, last, a manifest naming each shard's split, size and checksum and the split rule. Everything
is written in a ``.KEY.tmpPID`` folder renamed into place at the end, so a crash leaves only a
folder that the next run removes (``rundir.remove_orphaned_temporaries``).

Memory: at most ``2 x workers`` chunks of ``CHUNK_CHARS`` characters are in flight, and a worker
holds one chunk and its ids; the only thing held whole is a single document longer than a chunk.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .. import files
from ..errors import ConfigError, DamagedFile
from ..plugin.contract import Tokenizer

FORMAT = "gptlab-token-shards-1"
MANIFEST = "manifest.json"
CHUNK_CHARS = 1 << 22  #: characters of text per task handed to a worker (a longer document is one task)
SAMPLE_CHARS = 1 << 22  #: what a dry run tokenizes of a corpus it has not prepared
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
SPLITS = ("train", "val")

#: progress(chars read, documents, tokens written) after every chunk, for a progress bar
Progress = Callable[[int, int, int], None]


def default_workers() -> int:
    """The cores this process may run on (``data.workers`` when it is not set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def split_rule(val_fraction: float, own_split: bool) -> dict:
    """How documents were divided, stored in the manifest and part of the cache key."""
    if own_split:
        return {"rule": "source"}
    return {"rule": "document-hash", "hash": "blake2b-64", "val_fraction": val_fraction}


def in_validation(text: bytes, val_fraction: float) -> bool:
    """Whether a document belongs to validation: the first 64 bits of its BLAKE2b hash, read as a
    fraction of 2**64, fall below ``val_fraction``. Depends on the document alone."""
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") < val_fraction * 2.0 ** 64


def learns(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer learns its vocabulary from the corpus (overrides a fit method)."""
    kind = type(tokenizer)
    return kind.fit is not Tokenizer.fit or kind.fit_documents is not Tokenizer.fit_documents


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


# ---------------------------------------------------------------------------------------------
# The workers' side: one chunk of documents -> (train ids, val ids)
# ---------------------------------------------------------------------------------------------
_JOB: dict = {}  #: what every worker needs, set before the workers fork (never pickled)


def _set_job(tokenizer: Tokenizer, val_fraction: Optional[float], dtype: np.dtype) -> None:
    _JOB.update(tokenizer=tokenizer, val_fraction=val_fraction, dtype=dtype,
                eot=np.array([tokenizer.eot_id], dtype=dtype))


def _tokenize(task: tuple) -> tuple:
    """A chunk of documents of one split (``split``), or of both when the split is by hash (None)."""
    docs, split = task
    tok, fraction, dtype, eot = _JOB["tokenizer"], _JOB["val_fraction"], _JOB["dtype"], _JOB["eot"]
    parts: dict[str, list] = {"train": [], "val": []}
    for doc, ids in zip(docs, tok.encode_batch(docs)):
        side = split or ("val" if in_validation(doc.encode("utf-8"), fraction) else "train")
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0):
            raise ConfigError(f"tokenizer {type(tok).__name__} produced id {int(ids.max())} outside its "
                              f"{tok.vocab_size} ids; fix its encode")
        parts[side] += [ids.astype(dtype, copy=False), eot]
    return tuple((np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype), len(parts[s]) // 2)
                 for s in SPLITS)


def _die_with(parent: int) -> None:
    """A worker ends when its parent does, however that ends (a kill included): left alone it
    would wait on the task queue forever, holding the parent's output pipes open."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _chunks(documents: Iterable[str], split: Optional[str], where: str) -> Iterator[tuple]:
    """Documents grouped into tasks of about CHUNK_CHARS characters."""
    chunk, size = [], 0
    for doc in documents:
        if not isinstance(doc, str):
            raise ConfigError(f"{where} yielded a {type(doc).__name__}, not a document (str); "
                              f"fix the dataset's documents()")
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield chunk, split
            chunk, size = [], 0
    if chunk:
        yield chunk, split


def _results(tasks: Iterator[tuple], workers: int) -> Iterator[tuple]:
    """Each task's result, in task order; at most 2 x workers tasks in flight."""
    if workers <= 1:
        for task in tasks:
            yield task, _tokenize(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # a user's tokenizer
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),  # class needs fork:
                             initializer=_die_with, initargs=(os.getpid(),)) as pool:  # inherited, not pickled
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.submit(_tokenize, task)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


# ---------------------------------------------------------------------------------------------
# The parent's side: shards and the manifest
# ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Token files of one split, each at most ``limit`` tokens, hashed as they are written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, limit: int) -> None:
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, limit
        self.done: list[dict] = []
        self.fh, self.digest, self.count = None, None, 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self.fh is None:
                name = f"{self.split}_{len(self.done):06d}.bin"
                self.fh, self.digest, self.count = open(self.folder / name, "xb"), hashlib.sha256(), 0
                self.name = name
            take = ids[: self.limit - self.count]
            blob = take.tobytes()
            self.fh.write(blob)
            self.digest.update(blob)
            self.count += take.size
            ids = ids[take.size:]
            if self.count == self.limit:
                self._close()

    def _close(self) -> None:
        self.fh.close()
        self.done.append({"file": self.name, "split": self.split, "n_tokens": self.count,
                          "sha256": self.digest.hexdigest()})
        self.fh = None

    def finish(self) -> list[dict]:
        if self.fh is not None:
            self._close()
        return self.done


@dataclass
class Source:
    """What to prepare: the documents of each split (``val`` None: split by hash)."""

    train: Callable[[], Iterable[str]]
    val: Optional[Callable[[], Iterable[str]]]
    where: str  #: "data.dataset 'NAME'", for messages


def _training_documents(source: Source, val_fraction: float) -> Iterator[str]:
    """The documents the tokenizer may learn from: training ones only."""
    for doc in source.train():
        if source.val is not None or not in_validation(doc.encode("utf-8"), val_fraction):
            yield doc


def fit_tokenizer(tokenizer: Tokenizer, source: Source, val_fraction: float, name: str) -> None:
    """Learn the vocabulary (if the tokenizer learns one) and give it an end-of-text id."""
    if learns(tokenizer):
        tokenizer.fit_documents(_training_documents(source, val_fraction))
    if tokenizer.eot_id is None:
        try:
            tokenizer.add_eot()
        except ConfigError as exc:
            raise ConfigError(f"data.tokenizer '{name}': {exc}") from None


def write_shards(folder: Path, source: Source, tokenizer: Tokenizer, val_fraction: float, workers: int,
                 shard_tokens: int, progress: Optional[Progress] = None) -> dict:
    """Tokenize every document into shards in ``folder`` (which exists and is empty); returns the
    manifest without writing it."""
    dtype = token_dtype(tokenizer.vocab_size)
    _set_job(tokenizer, None if source.val is not None else val_fraction, dtype)
    writers = {s: ShardWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    tasks = _chunks(source.train(), "train" if source.val is not None else None, source.where)
    if source.val is not None:
        tasks = _chained(tasks, _chunks(source.val(), "val", source.where))
    chars = docs = tokens = 0
    counts = {s: 0 for s in SPLITS}
    started = time.perf_counter()
    for (chunk, _), result in _results(tasks, workers):
        for split, (ids, n) in zip(SPLITS, result):
            writers[split].write(ids)
            counts[split] += n
            tokens += ids.size
        chars += sum(len(d) for d in chunk)
        docs += len(chunk)
        if progress:
            progress(chars, docs, tokens)
    shards = writers["train"].finish() + writers["val"].finish()
    for split in SPLITS:
        if not counts[split]:
            rule = ("the source's own split" if source.val is not None else
                    f"val_fraction {val_fraction}, chosen by a hash of each document")
            raise ConfigError(f"{source.where}: no document fell in the {'validation' if split == 'val' else split} "
                              f"split ({docs} documents, {rule}); add documents"
                              + (", raise data.val_fraction" if source.val is None and split == "val" else ""))
    return {"format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
            "split": split_rule(val_fraction, source.val is not None), "documents": counts,
            "n_tokens": {s: sum(r["n_tokens"] for r in shards if r["split"] == s) for s in SPLITS},
            "characters": chars, "seconds": round(time.perf_counter() - started, 3),
            "tokenizer_state": tokenizer.state_dict(), "shards": shards}


def _chained(*iterators: Iterator) -> Iterator:
    for it in iterators:
        yield from it


def sample(source: Source, tokenizer: Tokenizer, val_fraction: float, limit: Optional[int] = None) -> tuple:
    """A dry run's look at a corpus: the first ``limit`` characters of each split tokenized in this
    process, nothing written. Returns (train ids, val ids, whether the whole corpus was seen)."""
    dtype, limit = token_dtype(tokenizer.vocab_size), limit or SAMPLE_CHARS
    _set_job(tokenizer, None if source.val is not None else val_fraction, dtype)
    out, complete = {"train": [], "val": []}, True
    for split, docs in (("train", source.train), ("val", source.val)):
        if docs is None:
            continue
        stream = iter(docs())
        head = list(first_chars(stream, limit))
        complete = complete and next(stream, None) is None
        for chunk in _chunks(head, split if source.val is not None else None, source.where):
            for name, (ids, _) in zip(SPLITS, _tokenize(chunk)):
                out[name].append(ids)
    return tuple(np.concatenate(out[s]) if out[s] else np.zeros(0, dtype) for s in SPLITS) + (complete,)


def first_chars(documents: Iterator[str], limit: int) -> Iterator[str]:
    seen = 0
    for doc in documents:
        yield doc
        seen += len(doc)
        if seen >= limit:
            return


def verified(folder: Path) -> Optional[dict]:
    """The manifest of a prepared folder when every shard matches it (name, size, sha256);
    otherwise None after a warning (the caller rebuilds: damaged shards would change the data)."""
    path = folder / MANIFEST
    try:
        manifest = files.load_json(path, dict)
        if manifest.get("format") != FORMAT:
            raise LookupError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(manifest["dtype"])
        for shard in manifest["shards"]:
            name = shard["file"]
            if not isinstance(name, str) or not SHARD_NAME.match(name) or shard["split"] != name.split("_")[0]:
                raise LookupError(f"a shard named {name!r}")
            file = folder / name
            files.refuse_link(file)
            if not file.is_file() or file.stat().st_size != shard["n_tokens"] * dtype.itemsize:
                raise LookupError(f"{name} does not have its {shard['n_tokens']} tokens")
            if files.file_sha256(file) != shard["sha256"]:
                raise LookupError(f"{name} does not match its checksum")
        if not isinstance(manifest["tokenizer_state"], dict):
            raise LookupError("no tokenizer state")
        return manifest
    except FileNotFoundError:
        reason = "no manifest: its preparation did not finish"
    except LookupError as exc:
        reason = str(exc) if not isinstance(exc, KeyError) else f"no {exc} in its manifest"
    except DamagedFile as exc:
        reason = f"its manifest is unreadable: {exc.reason}"
    except (ConfigError, OSError, ValueError, TypeError) as exc:
        reason = f"unreadable ({type(exc).__name__})"
    sys.stderr.write(f"gptlab: warning: token shards in {folder} cannot be trusted ({reason}); preparing them "
                     f"again\n")
    return None


def open_shards(folder: Path, manifest: dict) -> tuple[list, list]:
    """Each split's shards, memory-mapped read-only, in order."""
    dtype = np.dtype(manifest["dtype"])
    out: dict[str, list] = {s: [] for s in SPLITS}
    for shard in manifest["shards"]:
        if shard["n_tokens"]:
            out[shard["split"]].append(np.memmap(folder / shard["file"], dtype=dtype, mode="r"))
    return out["train"], out["val"]


def prepared_folder(cache_dir: Path, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """The verified folder for ``key``, built by ``build(tmp)`` (which fills ``tmp`` and returns
    the manifest) when missing or damaged. Written as ``.KEY.tmpPID`` and renamed into place; when
    another process finished the same folder first, its folder is used."""
    folder = cache_dir / key
    files.refuse_link(folder)
    if folder.exists():
        manifest = verified(folder)
        if manifest is not None:
            return folder, manifest
        shutil.rmtree(folder)  # rmtree never follows links inside the folder
    tmp = cache_dir / f".{key}.tmp{os.getpid()}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        files.refuse_link(tmp)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot write the token cache in {cache_dir} ({exc.strerror}); make it writable "
                          f"or choose another --results-dir") from None
    try:
        manifest = build(tmp)
        files.write_json_atomic(tmp / MANIFEST, manifest)
        try:
            os.rename(tmp, folder)
        except OSError:  # someone else's finished folder is there now: theirs is used
            shutil.rmtree(tmp)
            manifest = verified(folder)
            if manifest is None:
                raise ConfigError(f"the token cache {folder} was replaced while it was prepared; run again")
        return folder, manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe(manifest: dict) -> str:
    """One line for ``gptlab prepare``: tokens per split, shards, documents."""
    n = manifest["n_tokens"]
    docs = manifest.get("documents", {})
    rule = manifest["split"]
    split = ("the source's own split" if rule["rule"] == "source" else
             f"{rule['val_fraction']:g} of documents by hash")
    return (f"{n['train']:,} train + {n['val']:,} val tokens ({manifest['dtype']}), "
            f"{docs.get('train', 0):,} + {docs.get('val', 0):,} documents, {len(manifest['shards'])} shard(s); "
            f"validation: {split}")


__all__ = ["FORMAT", "CHUNK_CHARS", "Source", "default_workers", "fit_tokenizer", "write_shards", "sample",
           "verified", "open_shards", "prepared_folder", "in_validation", "split_rule", "describe"]
