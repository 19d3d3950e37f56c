"""Dataset 'tokens': token files another tool wrote, memory-mapped in place (never copied, never
re-tokenized). Two formats:

- ``nanogpt``: nanoGPT's ``train.bin`` / ``val.bin``, raw token ids (``dtype`` uint16, or uint32);
- ``llmc``: llm.c's and modded-nanogpt's shards: a header of 256 int32 (magic 20240520, version 1,
  the token count), then that many uint16 ids.

``auto`` (the default) reads each file's first int32: the llm.c magic means ``llmc``. ``train`` and
``val`` are a path, a glob or a list (several files are shards, in sorted order). Name the
tokenizer the files were made with in ``data.tokenizer`` (tiktoken's gpt2 for nanoGPT's and
llm.c's GPT-2 files); every id is checked against it before training.
"""
import glob
import os
from typing import Union

import numpy as np

import gptlab
from gptlab import ConfigError, Corpus

LLMC_MAGIC, LLMC_VERSION, HEADER_INTS = 20240520, 1, 256
FORMATS = ("auto", "nanogpt", "llmc")


def _files(patterns, key):
    files = []
    for pattern in patterns if isinstance(patterns, (list, tuple)) else [patterns]:
        where = gptlab.data_path(pattern, key=f"data.dataset.{key}")
        matches = sorted(glob.glob(where))
        if not matches:
            raise ConfigError(f"{key} '{pattern}' matches no file (looked for {where}; relative paths start at the "
                              f"experiment file's folder); fix data.dataset.{key}")
        files.extend(matches)
    return files


def _open(path, fmt, dtype):
    """One file's tokens as a read-only memory map, after its header (if any) is checked."""
    size = os.path.getsize(path)
    if fmt == "auto":
        with open(path, "rb") as f:
            first = np.frombuffer(f.read(4), dtype="<i4")
        fmt = "llmc" if len(first) and int(first[0]) == LLMC_MAGIC else "nanogpt"
    if fmt == "nanogpt":
        width = np.dtype(dtype).itemsize
        if size % width:
            raise ConfigError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; is it a token file "
                              f"of dtype {dtype}?")
        return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    if size < HEADER_INTS * 4:
        raise ConfigError(f"{path}: {size} bytes, shorter than an llm.c header ({HEADER_INTS * 4} bytes)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != LLMC_MAGIC:
        raise ConfigError(f"{path}: not an llm.c token shard (magic {magic}, expected {LLMC_MAGIC}); "
                          f"use format: nanogpt for raw token files")
    if version != LLMC_VERSION:
        raise ConfigError(f"{path}: llm.c shard version {version}; only version {LLMC_VERSION} (uint16 tokens) "
                          f"is read")
    if count < 0 or size != HEADER_INTS * 4 + 2 * count:
        raise ConfigError(f"{path}: the header says {count} tokens but the file holds "
                          f"{(size - HEADER_INTS * 4) / 2:g}; the shard is damaged or cut short")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(count,))


def tokens(train: Union[str, list], val: Union[str, list], format: str = "auto", dtype: str = "uint16"):
    """Token files read in place: nanoGPT's train.bin/val.bin or llm.c shards (globs or lists)."""
    if format not in FORMATS:
        raise ConfigError(f"option format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in ("uint16", "uint32"):
        raise ConfigError(f"option dtype must be uint16 or uint32, got {dtype!r}")
    splits = {"train": _files(train, "train"), "val": _files(val, "val")}
    stamp = ";".join(f"{k}:{os.path.abspath(f)}:{os.path.getsize(f)}:{os.path.getmtime(f)}"
                     for k, files in splits.items() for f in files)

    def read():
        raise ConfigError("dataset 'tokens' holds token ids, not text")

    def load():
        return tuple([_open(f, format, dtype) for f in splits[k]] for k in ("train", "val"))

    return Corpus(fingerprint=stamp, read=read, tokens=load)


@gptlab.hookimpl
def gptlab_register(register):
    register("dataset", "tokens", tokens)
