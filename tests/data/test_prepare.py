"""Documents corpora prepared into shards: the tokens equal a per-document reference (end-of-text
after each document, validation chosen by a hash of each document) whatever the workers and the
shard size; the split does not move when the corpus grows; damaged shards are rebuilt; a crash
leaves nothing the next run keeps; ``gptlab prepare`` prepares, then verifies."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gptlab.config.model import parse_section
from gptlab.config.run import DataConfig, RunSpec
from gptlab.data import prepare as shards
from gptlab.data.tokens import TokenShards, prepare_tokens
from gptlab.errors import ConfigError
from gptlab.plugin.manager import default_plugins
from gptlab.run.experiment import load_experiment

from helpers import cli_env, one_line_error, run_cli, write_lab

EOT = 256
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) + f" #{seed}.{i}" for i in range(n)]


def in_val(doc: str, fraction: float) -> bool:
    """The split rule written out here, apart from the library's."""
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") / 2.0 ** 64 < fraction


def reference(docs: list[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    out = {True: [], False: []}
    for doc in docs:
        out[in_val(doc, fraction)] += list(doc.encode()) + [EOT]
    return np.array(out[False], dtype=np.uint16), np.array(out[True], dtype=np.uint16)


def data(path, documents="line", **keys) -> DataConfig:
    return parse_section(DataConfig, {"dataset": {"name": "text", "path": str(path), "documents": documents},
                                      "tokenizer": "bytes", **keys}, "data")


def as_array(tokens) -> np.ndarray:
    return np.asarray(tokens[0:len(tokens)])


@pytest.fixture
def lines(tmp_path):
    docs = corpus_lines(400)
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n")
    return tmp_path / "corpus.txt", docs


@pytest.mark.parametrize("workers, shard_tokens", [(1, 100_000_000), (2, 1000), (3, 777)])
def test_shards_equal_the_per_document_reference(tmp_path, lines, monkeypatch, workers, shard_tokens):
    monkeypatch.setattr(shards, "CHUNK_CHARS", 2000)  # many chunks, so the workers share the corpus
    path, docs = lines
    got = prepare_tokens(data(path, workers=workers, shard_tokens=shard_tokens), default_plugins(), tmp_path / "c")
    train, val = reference(docs, 0.1)
    assert 0 < len(val) < len(train)
    assert np.array_equal(as_array(got.train), train) and np.array_equal(as_array(got.val), val)
    assert got.tokenizer.vocab_size == 257 and got.tokenizer.eot_id == EOT
    manifest = got.manifest
    assert manifest["documents"] == {"train": sum(not in_val(d, 0.1) for d in docs),
                                     "val": sum(in_val(d, 0.1) for d in docs)}
    assert all(s["n_tokens"] <= shard_tokens for s in manifest["shards"])
    assert len(manifest["shards"]) == -(-len(train) // shard_tokens) + -(-len(val) // shard_tokens)
    folder = tmp_path / "c" / next(p.name for p in (tmp_path / "c").iterdir())
    for s in manifest["shards"]:
        assert hashlib.sha256((folder / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    if len(manifest["shards"]) > 2:
        assert isinstance(got.train, TokenShards)  # memory-mapped shards read as one sequence


def test_the_split_of_a_document_does_not_move_when_the_corpus_grows(tmp_path):
    small, more = corpus_lines(300), corpus_lines(300, seed=1)
    (tmp_path / "a.txt").write_text("\n".join(small))
    (tmp_path / "b.txt").write_text("\n".join(small + more))
    plugins = default_plugins()
    before = prepare_tokens(data(tmp_path / "a.txt", workers=1), plugins, tmp_path / "c")
    after = prepare_tokens(data(tmp_path / "b.txt", workers=1), plugins, tmp_path / "c")
    val_before = set(before.tokenizer.decode(as_array(before.val).tolist()).split("<|endoftext|>")) - {""}
    val_after = set(after.tokenizer.decode(as_array(after.val).tolist()).split("<|endoftext|>")) - {""}
    assert val_before and val_before < val_after  # every validation document stays in validation
    assert val_before == {d for d in small if in_val(d, 0.1)}


def test_a_source_with_its_own_split_keeps_it(tmp_path):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "two_files.py").write_text(textwrap.dedent('''
        import gptlab
        def two_files():
            return gptlab.Corpus(fingerprint="two", documents=lambda: iter(["train one", "train two"]),
                                 val_documents=lambda: iter(["held out"]))
        @gptlab.hookimpl
        def gptlab_register(register):
            register("dataset", "two_files", two_files)
    '''))
    from gptlab.plugin.manager import build_plugin_system

    plugins = build_plugin_system(plugin_dirs=[plugin])
    cfg = parse_section(DataConfig, {"dataset": "two_files", "tokenizer": "bytes"}, "data")
    got = prepare_tokens(cfg, plugins, tmp_path / "c")
    assert got.tokenizer.decode(as_array(got.train).tolist()) == "train one<|endoftext|>train two<|endoftext|>"
    assert got.tokenizer.decode(as_array(got.val).tolist()) == "held out<|endoftext|>"
    assert got.manifest["split"] == {"rule": "source"}


def test_a_damaged_shard_is_rebuilt_with_a_warning(tmp_path, lines, capsys):
    path, docs = lines
    cfg = data(path, workers=1, shard_tokens=2000)
    first = as_array(prepare_tokens(cfg, default_plugins(), tmp_path / "c").train).copy()
    folder = next((tmp_path / "c").iterdir())
    victim = folder / "train_000001.bin"
    blob = bytearray(victim.read_bytes())
    blob[10] ^= 1
    victim.write_bytes(bytes(blob))
    again = prepare_tokens(cfg, default_plugins(), tmp_path / "c")
    err = capsys.readouterr().err
    assert "train_000001.bin does not match its checksum" in err and "preparing them again" in err
    assert np.array_equal(as_array(again.train), first)
    assert np.array_equal(as_array(again.train), reference(docs, 0.1)[0])


def test_workers_and_shard_size_leave_the_config_hash_alone(tmp_path):
    base = {"name": "x", "model": {"preset": "nano"}, "variants": {"a": {}}, "seeds": [0]}
    plain = load_experiment(write_lab(tmp_path / "1", base)).runs[0]
    tuned = load_experiment(write_lab(tmp_path / "2", {**base, "data": {"workers": 3, "shard_tokens": 5000}})).runs[0]
    assert isinstance(plain, RunSpec) and plain.config_hash == tuned.config_hash
    with pytest.raises(ConfigError, match="data.workers"):
        data("x", workers=0).validate()
    with pytest.raises(ConfigError, match="data.shard_tokens"):
        data("x", shard_tokens=0).validate()


def test_no_document_in_validation_is_a_one_line_error(tmp_path):
    (tmp_path / "one.txt").write_text("a single document\n")
    with pytest.raises(ConfigError, match="no document fell in the validation split .1 documents"):
        prepare_tokens(data(tmp_path / "one.txt", workers=1), default_plugins(), tmp_path / "c")
    assert not any((tmp_path / "c").iterdir())  # its unfinished folder is gone


def test_a_documents_corpus_needs_room_for_the_end_of_text_id(capsys, tmp_path, lines):
    path, _ = lines
    exp = write_lab(tmp_path, {"name": "d", "model": {"preset": "nano", "vocab_size": 256},
                               "data": {"dataset": {"name": "text", "path": "corpus.txt", "documents": "line"}},
                               "variants": {"a": {}}, "seeds": [0]})
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "r", "--dry-run")
    one_line_error(rc, err, "257", "set model.vocab_size=257")


def test_a_dry_run_reads_only_the_start_of_a_large_corpus(tmp_path, capsys, monkeypatch):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "endless.py").write_text(textwrap.dedent('''
        import itertools, os
        import gptlab
        def endless():
            def docs():
                for i in itertools.count():
                    with open(os.environ["ENDLESS_LOG"], "w") as fh:
                        fh.write(str(i + 1))  # documents read so far
                    yield f"document number {i} " * 20
            return gptlab.Corpus(fingerprint="endless", documents=docs)
        @gptlab.hookimpl
        def gptlab_register(register):
            register("dataset", "endless", endless)
    '''))
    monkeypatch.setattr(shards, "SAMPLE_CHARS", 100_000)
    monkeypatch.setenv("ENDLESS_LOG", str(tmp_path / "seen"))
    exp = write_lab(tmp_path, {"name": "d", "plugins": ["plugins/endless.py"],
                               "model": {"preset": "nano", "vocab_size": 257},
                               "data": {"dataset": "endless"}, "variants": {"a": {}}, "seeds": [0]})
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "r", "--dry-run")
    assert rc == 0, err
    seen = int((tmp_path / "seen").read_text())
    assert 0 < seen < 400  # ~100,000 characters of documents of ~400: the start, then it stopped
    assert not (tmp_path / "r").exists()


def test_prepare_prepares_then_verifies(capsys, tmp_path, lines):
    exp = write_lab(tmp_path / "lab", {"name": "d", "model": {"preset": "nano", "vocab_size": 257},
                                       "data": {"dataset": {"name": "text", "path": "../corpus.txt",
                                                            "documents": "line"}, "shard_tokens": 3000},
                                       "variants": {"a": {}, "b": {"train": {"lr": 0.002}}}, "seeds": [0]})
    rc, out, err = run_cli(capsys, "prepare", exp, "--results-dir", tmp_path / "r")
    assert rc == 0, err
    assert out.count("text + bytes: prepared in") == 1  # one corpus for both variants
    assert "documents" in out and "by hash" in out
    rc, out, err = run_cli(capsys, "prepare", exp, "--results-dir", tmp_path / "r")
    assert rc == 0 and "text + bytes: verified in" in out, err


def test_relative_paths_start_at_the_experiment_file(capsys, tmp_path, monkeypatch, lines):
    path, _ = lines
    lab = tmp_path / "lab"
    exp = write_lab(lab, {"name": "d", "model": {"preset": "nano", "vocab_size": 257},
                          "data": {"dataset": {"name": "text", "path": "data/corpus.txt", "documents": "line"}},
                          "variants": {"a": {}}, "seeds": [0]})
    (lab / "data").mkdir()
    (lab / "data" / "corpus.txt").write_text(path.read_text())
    monkeypatch.chdir(tmp_path)  # not where the experiment is
    rc, out, err = run_cli(capsys, "prepare", exp, "--results-dir", tmp_path / "r")
    assert rc == 0 and "prepared" in out and "warning" not in err, err
    # the old form: a path that resolves only from the current directory still works, with a warning
    old = write_lab(lab, {"name": "e", "model": {"preset": "nano", "vocab_size": 257},
                          "data": {"dataset": {"name": "text", "path": "corpus.txt", "documents": "line"}},
                          "variants": {"a": {}}, "seeds": [0]}, name="old.yaml")
    rc, out, err = run_cli(capsys, "prepare", old, "--results-dir", tmp_path / "r")
    assert rc == 0, err
    assert "data.dataset.path 'corpus.txt' was found from the current directory" in err
    assert "write '../corpus.txt'" in err


CRASH = """
import os, sys
from gptlab.data import prepare
real = prepare.ShardWriter._close
def close(self):
    real(self)
    os._exit(9)  # killed after the first shard is complete
prepare.ShardWriter._close = close
from gptlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_crash_while_preparing_leaves_nothing_after_the_next_run(capsys, tmp_path, lines):
    path, docs = lines
    exp = write_lab(tmp_path, {"name": "d", "model": {"preset": "nano", "vocab_size": 257, "n_layers": 1,
                                                      "context_length": 32},
                               "data": {"dataset": {"name": "text", "path": "corpus.txt", "documents": "line"},
                                        "shard_tokens": 2000},
                               "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "log_every": 2,
                                         "eval_batches": 1},
                               "variants": {"a": {}}, "seeds": [0]})
    proc = subprocess.run([sys.executable, "-c", CRASH, "run", str(exp), "--results-dir", "r", "--device", "cpu",
                           "--quiet"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "r").rglob(".*.tmp*"))
    assert len(left) == 1 and left[0].startswith("."), left  # the unfinished shards folder
    rc, out, err = run_cli(capsys, "run", exp, "--results-dir", tmp_path / "r", "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert sorted((tmp_path / "r").rglob(".*.tmp*")) == []
    cache = [p for p in (tmp_path / "r" / ".cache" / "tokens").iterdir()]
    assert len(cache) == 1 and (cache[0] / "manifest.json").is_file()


def test_existing_whole_text_experiments_keep_their_tokens(tmp_path, lines):
    path, _ = lines
    cfg = parse_section(DataConfig, {"dataset": {"name": "text", "path": str(path)}, "tokenizer": "bytes"}, "data")
    got = prepare_tokens(cfg, default_plugins(), tmp_path / "c")
    ids = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    n_val = int(len(ids) * 0.1)
    assert np.array_equal(np.asarray(got.train), ids[: len(ids) - n_val])
    assert got.tokenizer.vocab_size == 256 and got.tokenizer.eot_id is None and got.manifest is None


def test_export_names_the_end_of_text_id_a_documents_corpus_gave(tmp_path, lines):
    from gptlab.hf.checkpoint import end_of_text_id

    path, _ = lines
    got = prepare_tokens(data(path, workers=1), default_plugins(), tmp_path / "c")
    assert end_of_text_id(got.tokenizer) == EOT
    whole = prepare_tokens(parse_section(DataConfig, {"dataset": {"name": "text", "path": str(path)},
                                                      "tokenizer": "bytes"}, "data"), default_plugins(), tmp_path / "c")
    assert end_of_text_id(whole.tokenizer) is None  # 256 bytes, no end-of-text id: as before
