"""Token streams for training: a registered corpus, a registered tokenizer, a memory-mapped cache.

A dataset factory returns a ``gptlab.Corpus`` and a tokenizer factory a ``gptlab.Tokenizer``
(both in ``gptlab.data.text``). Tokens are prepared once per (corpus, tokenizer) and cached; later
runs memory-map them. A documents corpus becomes sharded token files with a hash-chosen
validation split (``gptlab.data.prepare``); a corpus read whole (``read``) becomes one flat array
whose validation split is the tail fraction, as before documents existed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .. import rundir as rd
from . import prepare as shards
from ..errors import ConfigError, DamagedFile
from ..plugin.contract import EXPERIMENT_DIR
from ..plugin.manager import PluginSystem
from ..rundir import file_sha256, refuse_link, write_json_atomic
from ..config.run import DataConfig


@dataclass
class TokenData:
    train: Any  #: token ids: an array, or a TokenShards of memory-mapped shards
    val: Any
    tokenizer: Any
    #: False when a dry run looked at the start of a large corpus only (split sizes unknown)
    complete: bool = True
    #: the prepared shards' manifest (documents corpora), for ``gptlab prepare``'s report
    manifest: Optional[dict] = None


def build_tokenizer(spec, plugins: PluginSystem, state: Optional[dict] = None) -> Any:
    entry = plugins.registry.lookup("tokenizer", spec.name, spec.options)
    try:
        tok = entry.factory(**spec.options)
    except ConfigError as exc:
        raise ConfigError(f"data.tokenizer '{spec.name}': {exc}") from None
    if state:
        tok.load_state_dict(state)
    return tok


@contextmanager
def experiment_dir(base_dir: Optional[Path]) -> Iterator[None]:
    """Relative paths a plugin resolves with ``gptlab.data_path`` start at ``base_dir``."""
    token = EXPERIMENT_DIR.set(Path(base_dir).resolve() if base_dir is not None else None)
    try:
        yield
    finally:
        EXPERIMENT_DIR.reset(token)


def build_corpus(data: DataConfig, plugins: PluginSystem, base_dir: Optional[Path] = None) -> Any:
    entry = plugins.registry.lookup("dataset", data.dataset.name, data.dataset.options)
    try:
        with experiment_dir(base_dir):
            return entry.factory(**data.dataset.options)
    except ConfigError as exc:
        raise ConfigError(f"data.dataset '{data.dataset.name}': {exc}") from None


def prepare_tokens(data: DataConfig, plugins: PluginSystem, cache_dir: Path, write: bool = True,
                   base_dir: Optional[Path] = None, progress: Optional[shards.Progress] = None) -> TokenData:
    """Tokenize the corpus once and memory-map the cached tokens (``write=False``, a dry run: use the
    cache if it is there, else look at the corpus, or its start when it is large, and write nothing).
    ``base_dir`` is the experiment file's folder, where relative dataset paths start."""
    corpus = build_corpus(data, plugins, base_dir)
    tokenizer = build_tokenizer(data.tokenizer, plugins)
    if getattr(corpus, "tokens", None) is not None:
        return _ready_tokens(data, corpus, tokenizer)
    if getattr(corpus, "documents", None) is not None:
        return _document_tokens(data, corpus, tokenizer, cache_dir, write, progress)
    if getattr(corpus, "read", None) is None:
        raise ConfigError(f"data.dataset '{data.dataset.name}' gives no text: its Corpus sets none of documents, "
                          f"read and tokens; fix the dataset plugin")
    return _whole_text_tokens(data, corpus, tokenizer, cache_dir, write)


def _cache_key(data: DataConfig, corpus: Any, *extra: Any) -> str:
    return hashlib.sha256(json.dumps(
        [data.dataset.name, data.dataset.options, data.tokenizer.name, data.tokenizer.options, corpus.fingerprint,
         *extra], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _document_tokens(data: DataConfig, corpus: Any, tokenizer: Any, cache_dir: Path, write: bool,
                     progress: Optional[shards.Progress]) -> TokenData:
    """A documents corpus: sharded token files under ``cache_dir/KEY/`` with a manifest."""
    where = f"data.dataset '{data.dataset.name}'"
    source = shards.Source(corpus.documents, getattr(corpus, "val_documents", None), where)
    rule = shards.split_rule(data.val_fraction, source.val is not None)
    key = _cache_key(data, corpus, shards.FORMAT, rule)
    folder = cache_dir / key
    manifest = shards.verified(folder) if (folder / shards.MANIFEST).exists() else None
    if manifest is None and not write:  # a dry run: the start of the corpus, nothing written
        shards.fit_tokenizer(tokenizer, source, data.val_fraction, data.tokenizer.name)             if not shards.learns(tokenizer) else _fit_on_sample(tokenizer, source, data)
        train, val, complete = shards.sample(source, tokenizer, data.val_fraction)
        return TokenData(train, val, tokenizer, complete=complete)
    if manifest is None:
        def build(tmp: Path) -> dict:
            started = time.perf_counter()
            shards.fit_tokenizer(tokenizer, source, data.val_fraction, data.tokenizer.name)
            fitted = time.perf_counter() - started
            return {**shards.write_shards(tmp, source, tokenizer, data.val_fraction,
                                          data.workers or shards.default_workers(), data.shard_tokens, progress),
                    "fit_seconds": round(fitted, 3)}
        folder, manifest = shards.prepared_folder(cache_dir, key, build)
    tokenizer.load_state_dict(manifest["tokenizer_state"])
    train, val = shards.open_shards(folder, manifest)
    return TokenData(TokenShards.of(train), TokenShards.of(val), tokenizer, manifest=manifest)


def _fit_on_sample(tokenizer: Any, source: "shards.Source", data: DataConfig) -> None:
    """A dry run fits a learned vocabulary on the corpus's start only, to check it trains."""
    head = shards.Source(lambda: shards.first_chars(iter(source.train()), shards.SAMPLE_CHARS), source.val,
                         source.where)
    shards.fit_tokenizer(tokenizer, head, data.val_fraction, data.tokenizer.name)


def _whole_text_tokens(data: DataConfig, corpus: Any, tokenizer: Any, cache_dir: Path, write: bool) -> TokenData:
    """A corpus read whole: one flat cached array, the validation split its tail."""
    key = _cache_key(data, corpus)
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    meta = _verified_cache(bin_path, meta_path) if meta_path.exists() or bin_path.exists() else None
    if meta is not None:
        tokenizer.load_state_dict(meta["tokenizer_state"])
    else:
        text = corpus.read()
        if not text:
            raise ConfigError(f"data.dataset '{data.dataset.name}' is empty; point it at a non-empty text")
        tokenizer.fit(text)
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
        if not write:  # a dry run checks the data without leaving a cache behind
            n_val = int(len(ids) * data.val_fraction)
            return TokenData(ids[: len(ids) - n_val], ids[len(ids) - n_val:], tokenizer)
        blob = ids.astype(dtype).tobytes()
        meta = {"dtype": np.dtype(dtype).name, "n_tokens": int(ids.size), "vocab_size": tokenizer.vocab_size,
                "sha256": hashlib.sha256(blob).hexdigest(), "tokenizer_state": tokenizer.state_dict(),
                "dataset": data.dataset.to_plain(), "tokenizer": data.tokenizer.to_plain()}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = bin_path.with_name(f".{bin_path.name}.tmp{os.getpid()}")
            refuse_link(bin_path)
            tmp.unlink(missing_ok=True)  # a stale one, or a planted link: never written through
            tmp.write_bytes(blob)
            os.replace(tmp, bin_path)
            write_json_atomic(meta_path, meta)
        except OSError as exc:
            raise ConfigError(f"cannot write the token cache in {cache_dir} ({exc.strerror}); make it writable "
                              f"or choose another --results-dir") from None
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
    n_val = int(len(tokens) * data.val_fraction)
    return TokenData(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:], tokenizer)


def _ready_tokens(data: DataConfig, corpus: Any, tokenizer: Any) -> TokenData:
    """A source of token ids made elsewhere, used in place: no text, no cache, no copy. The ids
    must fit the tokenizer they were made with (checked over every token, in blocks)."""
    where = f"data.dataset '{data.dataset.name}'"
    if not tokenizer.vocab_size:
        raise ConfigError(f"{where} holds token ids, and tokenizer '{data.tokenizer.name}' learns its vocabulary "
                          f"from text; name the tokenizer the files were made with (bytes, tiktoken, ...)")
    try:
        train, val = corpus.tokens()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    train, val = TokenShards.of(train), TokenShards.of(val)
    for split, tokens in (("train", train), ("val", val)):
        top = _max_id(tokens)
        if top >= tokenizer.vocab_size:
            raise ConfigError(f"{where}: the {split} tokens hold id {top}, beyond tokenizer "
                              f"'{data.tokenizer.name}' ({tokenizer.vocab_size} ids); name the tokenizer they "
                              f"were made with")
    return TokenData(train, val, tokenizer)


class TokenShards:
    """Several token arrays (memory-mapped shards) read as one sequence: ``len`` and slices that
    may cross a shard's end, which is all batches and evaluation ask of a token array."""

    BLOCK = 1 << 24  # tokens per block when scanning for the largest id

    def __init__(self, shards: list) -> None:
        self.shards = [s for s in shards if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    @classmethod
    def of(cls, tokens: Any) -> Any:
        """One array stays itself; a list of arrays becomes a TokenShards."""
        if isinstance(tokens, (list, tuple)):
            return tokens[0] if len(tokens) == 1 else cls(list(tokens))
        return tokens

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TokenShards takes plain slices")
        start, stop, _ = item.indices(len(self))
        parts = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop and i < len(self.shards):
            lo = start - int(self.starts[i])
            take = min(stop, int(self.starts[i + 1])) - start
            parts.append(np.asarray(self.shards[i][lo: lo + take]))
            start += take
            i += 1
        if not parts:
            return np.zeros(0, dtype=self.shards[0].dtype if self.shards else np.uint16)
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def max_id(self) -> int:
        return max(_max_id(s, self.BLOCK) for s in self.shards)


def _max_id(tokens: Any, block: int = TokenShards.BLOCK) -> int:
    if isinstance(tokens, TokenShards):
        return tokens.max_id()
    return max((int(np.max(tokens[i: i + block])) for i in range(0, len(tokens), block)), default=-1)


def _verified_cache(bin_path: Path, meta_path: Path) -> Optional[dict]:
    """The cache's metadata when the token file matches it (length and sha256); otherwise None,
    after a warning, and the cache is rebuilt: a damaged cache would silently change the data."""
    try:
        meta = rd.load_json(meta_path, dict)
        if "sha256" not in meta:
            raise LookupError("written by an earlier gptlab, without a checksum")
        size = bin_path.stat().st_size  # the cheap test first; the hash reads the file in blocks
        if size and size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize and \
                file_sha256(bin_path) == meta["sha256"] and isinstance(meta["tokenizer_state"], dict):
            return meta
        reason = "its tokens do not match its length and checksum"
    except LookupError as exc:
        reason = str(exc) if not isinstance(exc, KeyError) else f"no {exc} in its metadata"
    except DamagedFile as exc:
        reason = f"its metadata is unreadable: {exc.reason}"
    except (OSError, ValueError, TypeError) as exc:
        reason = f"unreadable ({type(exc).__name__})"
    sys.stderr.write(f"gptlab: warning: token cache {bin_path} cannot be trusted ({reason}); rebuilding it\n")
    return None


class Batches:
    """Random training windows from a token array, reproducible from a seed.

    With ``part=(rank, world)`` every rank draws the same ``batch_size`` windows and keeps its own
    slice of them, so the ranks together train on exactly the batch one process would.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device: torch.device,
                 part: tuple[int, int] = (0, 1)) -> None:
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.gen = torch.Generator().manual_seed(seed)
        self.pin = device.type == "cuda"
        rank, world = part
        per_rank = batch_size // world
        self.slice = slice(rank * per_rank, (rank + 1) * per_rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        return windows(self.tokens, starts.tolist()[self.slice], self.seq_len, self.device, self.pin)


def windows(tokens: np.ndarray, starts: list[int], seq_len: int, device: torch.device,
            pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at ``starts``."""
    block = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(block)
    if pin:
        t = t.pin_memory()
    t = t.to(device, non_blocking=pin)
    return t[:, :-1], t[:, 1:]


def eval_starts(n_tokens: int, seq_len: int, count: int) -> list[int]:
    """Evenly spaced, non-random window starts, so every run is scored on the same text."""
    last = n_tokens - seq_len - 1
    if last < 0:
        return []
    if count <= 1 or last == 0:
        return [0]
    return sorted({round(i * last / (count - 1)) for i in range(count)})
