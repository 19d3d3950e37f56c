"""Data through a real run: the text dataset (one file or a glob) with the char tokenizer, the token
cache shared between experiments, and a train/validation split that is the same for every seed."""
from __future__ import annotations

import json
import math

from gptlab.plugin.manager import PluginSystem
from gptlab.run.experiment import load_experiment
from gptlab.run.preflight import preflight

from helpers import write_lab

TRAIN = {"steps": 10, "batch_size": 4, "eval_every": 10, "eval_batches": 1, "log_every": 5}
# ~2.9k characters, some of them multi-byte in UTF-8, so a char tokenizer and a byte one differ
CORPUS = ("The quick brown fox jumps over the lazy dog. Ça va? λ → ∞. " * 3 + "\n") * 16


def summaries(exp_dir) -> dict:
    """variant -> summary.json of its one run (seed 0); exactly one directory per variant."""
    dirs = [d for d in sorted(exp_dir.iterdir()) if d.is_dir()]
    found = {d.name.split("__")[0]: json.loads((d / "summary.json").read_text()) for d in dirs}
    assert len(found) == len(dirs), [d.name for d in dirs]
    return found


def test_text_dataset_char_tokenizer_glob_and_token_cache(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative dataset paths start at the current directory
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"part{i}.txt").write_text(f"part {i}: " + CORPUS)
    single = tmp_path / "single.txt"
    single.write_text("A single file. " + CORPUS)
    doc = {"name": "data1", "model": {"preset": "nano"}, "data": {"dataset": "python_docs", "tokenizer": "char"},
           "train": dict(TRAIN), "seeds": [0],
           "variants": {"file": {"data": {"dataset": {"name": "text", "path": str(single)}}},
                        "glob": {"data": {"dataset": {"name": "text", "path": "corpus/*.txt"}}}}}
    exp = write_lab(tmp_path, doc, "data1.yaml")
    results = tmp_path / "results"
    rc, out, err = cli("run", exp, "--results-dir", results, "--device", "cpu")
    assert rc == 0, err
    runs = summaries(results / "data1")
    assert sorted(runs) == ["file", "glob"]
    for s in runs.values():
        assert s["status"] == "completed" and math.isfinite(s["final_val_loss"])

    cache = results / ".cache" / "tokens"
    bins = sorted(cache.glob("*.bin"))
    assert len(bins) == 2  # one per (corpus, tokenizer)
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in bins]
    n_tokens = sorted(m["n_tokens"] for m in metas)
    glob_text = "\n".join((tmp_path / "corpus" / f"part{i}.txt").read_text() for i in range(3))
    assert n_tokens == sorted([len(single.read_text()), len(glob_text)])  # one token per character
    assert len(glob_text) < len(glob_text.encode())  # (not per byte)
    assert all(m["tokenizer"] == "char" for m in metas)
    # the vocabulary is the corpus' characters plus <|endoftext|> and <|unk|>
    assert sorted(m["vocab_size"] for m in metas) == sorted([len(set(single.read_text())) + 2,
                                                             len(set(glob_text)) + 2])
    cached = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.iterdir()}

    # a second experiment with the same data reuses the cache: no new files, nothing rewritten
    doc["name"] = "data2"
    doc["train"]["steps"] = 5
    exp2 = write_lab(tmp_path, doc, "data2.yaml")
    rc, out, err = cli("run", exp2, "--results-dir", results, "--device", "cpu")
    assert rc == 0, err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.iterdir()} == cached
    assert [s["status"] for s in summaries(results / "data2").values()] == ["completed", "completed"]


def test_train_val_split_does_not_depend_on_the_seed(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    doc = {"name": "split", "model": {"preset": "nano"}, "train": dict(TRAIN), "seeds": [0, 1, 7],
           "data": {"dataset": {"name": "text", "path": str(tmp_path / "c.txt")}, "tokenizer": "bytes",
                    "val_fraction": 0.2},
           "variants": {"a": {}}}
    exp = load_experiment(write_lab(tmp_path, doc, "split.yaml"))
    assert [r.seed for r in exp.runs] == [0, 1, 7]
    assert len({r.config_hash for r in exp.runs}) == 1  # the seed is not part of the config
    system = PluginSystem()
    system.load_builtins()
    data = preflight(exp, system, tmp_path / "cache")
    assert len(data) == 1  # one token stream (and so one split) for every seed
    (tokens,) = data.values()
    full = list(CORPUS.encode())
    n_val = int(len(full) * 0.2)
    assert tokens.val.tolist() == full[len(full) - n_val:]  # the held-out tail
    assert tokens.train.tolist() == full[: len(full) - n_val]
    again = preflight(exp, system, tmp_path / "cache")  # from the cache this time
    (tokens2,) = again.values()
    assert tokens2.val.tolist() == tokens.val.tolist()
