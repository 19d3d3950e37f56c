"""Dataset 'tokens': nanoGPT's train.bin/val.bin and llm.c shards read in place. A run on them
trains exactly as a run on the same text tokenized by gptlab; nothing is copied or cached; a file
whose header lies, a wrong tokenizer or an id beyond the vocabulary is a one-line error."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gptlab.config.run import DataConfig
from gptlab.config.model import parse_section
from gptlab.data.tokens import TokenShards, prepare_tokens
from gptlab.plugin.manager import default_plugins

from helpers import one_line_error, run_cli, write_lab

TEXT = ("def walk(top):\n    for name in listdir(top):\n        yield join(top, name)\n" * 120).encode()
IDS = np.frombuffer(TEXT, dtype=np.uint8).astype(np.uint16)
N_VAL = int(len(IDS) * 0.1)  # the tail split the text dataset makes with val_fraction 0.1
TRAIN, VAL = IDS[: len(IDS) - N_VAL], IDS[len(IDS) - N_VAL:]


def shard(path, ids, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(ids) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(ids, dtype="<u2").tobytes())


@pytest.fixture
def files(tmp_path):
    TRAIN.tofile(tmp_path / "train.bin")
    VAL.tofile(tmp_path / "val.bin")
    cut = len(TRAIN) // 3
    shard(tmp_path / "fw_train_000.bin", TRAIN[:cut])
    shard(tmp_path / "fw_train_001.bin", TRAIN[cut:])
    shard(tmp_path / "fw_val_000.bin", VAL)
    (tmp_path / "corpus.txt").write_bytes(TEXT)
    return tmp_path


def data(**dataset) -> DataConfig:
    return parse_section(DataConfig, {"dataset": {"name": "tokens", **dataset}, "tokenizer": "bytes"}, "data")


def test_both_formats_are_read_in_place_as_written(files):
    cache = files / "cache"
    nano = prepare_tokens(data(train=str(files / "train.bin"), val=str(files / "val.bin")), default_plugins(), cache)
    llmc = prepare_tokens(data(train=str(files / "fw_train_*.bin"), val=str(files / "fw_val_*.bin")),
                          default_plugins(), cache)
    assert isinstance(nano.train, np.memmap) and isinstance(nano.val, np.memmap)  # mapped, not read into memory
    assert isinstance(llmc.train, TokenShards) and all(isinstance(s, np.memmap) for s in llmc.train.shards)
    for got in (nano, llmc):
        assert len(got.train) == len(TRAIN) and np.array_equal(got.train[:], TRAIN)
        assert np.array_equal(np.asarray(got.val[:]), VAL)
    assert not cache.exists()  # nothing copied into a cache


def test_shards_read_as_one_sequence_across_their_ends():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, n).astype(np.uint16) for n in (5, 1, 0, 17, 9)]
    whole, shards = np.concatenate(parts), TokenShards(parts)
    assert len(shards) == len(whole) == 32 and shards.max_id() == int(whole.max())
    for start in range(0, 33):
        for stop in range(start, 34):
            assert np.array_equal(shards[start:stop], whole[start:stop]), (start, stop)
    with pytest.raises(TypeError):
        shards[::2]


def test_a_run_on_token_files_trains_as_the_same_text_tokenized(capsys, files):
    exp = {"name": "tk", "model": {"preset": "nano", "n_layers": 1, "context_length": 32},
           "data": {"tokenizer": "bytes", "val_fraction": 0.1},
           "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "log_every": 3},
           "variants": {"text": {"data": {"dataset": {"name": "text", "path": str(files / "corpus.txt")}}},
                        "nanogpt": {"data": {"dataset": {"name": "tokens", "train": str(files / "train.bin"),
                                                         "val": str(files / "val.bin")}}},
                        "llmc": {"data": {"dataset": {"name": "tokens", "train": str(files / "fw_train_*.bin"),
                                                      "val": str(files / "fw_val_*.bin"), "format": "llmc"}}}},
           "seeds": [0]}
    results = files / "results"
    rc, out, err = run_cli(capsys, "run", write_lab(files, exp), "--results-dir", results, "--device", "cpu",
                           "--quiet")
    assert rc == 0, err
    curves = {}
    for run in (results / "tk").glob("*__s0"):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves[run.name.split("__")[0]] = [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]
    assert sorted(curves) == ["llmc", "nanogpt", "text"]
    assert curves["nanogpt"] == curves["text"] and curves["llmc"] == curves["text"]  # the same tokens, bit for bit
    cached = list((results / ".cache" / "tokens").glob("*.bin"))
    assert len(cached) == 1  # only the text variant was tokenized and cached


@pytest.mark.parametrize("make, dataset, words", [
    (lambda d: shard(d / "bad.bin", VAL, magic=1234), {"format": "llmc", "train": "fw_train_*.bin"},
     ["bad.bin", "not an llm.c token shard (magic 1234"]),
    (lambda d: shard(d / "bad.bin", VAL, version=2), {}, ["bad.bin", "version 2"]),
    (lambda d: shard(d / "bad.bin", VAL, count=len(VAL) + 7), {}, ["bad.bin", f"header says {len(VAL) + 7} tokens"]),
    (lambda d: (d / "bad.bin").write_bytes(b"\x01\x02\x03"), {"format": "nanogpt"}, ["bad.bin", "not a whole number"]),
    (lambda d: np.array([1, 2, 300] * 100, dtype=np.uint16).tofile(d / "bad.bin"), {},
     ["the val tokens hold id 300", "tokenizer 'bytes' (256 ids)"]),
    (lambda d: None, {}, ["val", "matches no file"]),
])
def test_token_files_that_cannot_be_trusted_are_one_line_errors(capsys, files, make, dataset, words):
    make(files)
    exp = {"name": "bad", "model": {"preset": "nano", "n_layers": 1, "context_length": 32},
           "data": {"dataset": {"name": "tokens", "train": str(files / "train.bin"), "val": str(files / "bad.bin"),
                                **{k: str(files / v) if k == "train" else v for k, v in dataset.items()}},
                    "tokenizer": "bytes"},
           "train": {"steps": 2, "batch_size": 2}}
    rc, out, err = run_cli(capsys, "run", write_lab(files, exp), "--dry-run", "--results-dir", files / "r")
    one_line_error(rc, err, *words)


def test_a_tokenizer_that_learns_from_text_is_refused(capsys, files):
    exp = {"name": "bad", "model": {"preset": "nano", "n_layers": 1, "context_length": 32},
           "data": {"dataset": {"name": "tokens", "train": str(files / "train.bin"), "val": str(files / "val.bin")},
                    "tokenizer": "char"},
           "train": {"steps": 2, "batch_size": 2}}
    rc, out, err = run_cli(capsys, "run", write_lab(files, exp), "--dry-run", "--results-dir", files / "r")
    one_line_error(rc, err, "holds token ids", "tokenizer 'char' learns its vocabulary")
