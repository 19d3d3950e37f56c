"""Tokenizer 'bpe' (byte-level BPE trained with Hugging Face tokenizers): any text round-trips,
the vocabulary keeps to vocab_size, <|endoftext|> is a special id that document text never
produces, training is reproducible and its state survives JSON, the batch path equals the single
one (in a forked worker too, silently), token byte counts add up, options fail in one line, and a
documents corpus is prepared with it once and then read back from the cache."""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from gptlab.config.model import parse_section  # noqa: E402
from gptlab.config.run import DataConfig  # noqa: E402
from gptlab.data import prepare as shards  # noqa: E402
from gptlab.data.tokens import build_tokenizer, prepare_tokens  # noqa: E402
from gptlab.errors import ConfigError  # noqa: E402

from helpers import one_line_error, run_cli, write_lab  # noqa: E402

EOT = "<|endoftext|>"
PARALLELISM = "TOKENIZERS_PARALLELISM"
STDLIB = Path(os.__file__).parent
SOURCES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py",
           "fnmatch.py", "glob.py", "bisect.py", "heapq.py"]
ODD = ["naïve café — déjà vu", "emoji 😀🎉 and 漢字 and עברית", "  leading spaces\tand\ttabs   ",
       "a literal <|endoftext|> inside a line", "<|endoftext|>", "\x00\x01 control \x7f bytes"]
SAMPLES = ["", " ", "\n\n\n", "   \t  \r\n  ", "hello world", " leading space", "trailing space ",
           "def f(x):\n    return x  # comment\n", "😀", "🏳️‍🌈 family 👨‍👩‍👧", "naïve façade ÆØÅ ß ſ",
           "日本語のテキスト", "mixed: abc😀déf\t\t\n", EOT, f"a{EOT}b", f"{EOT}{EOT}", "<|endof", "\x00\uffff\U0010ffff",
           "x" * 3000, "ab " * 500]


def stdlib_lines() -> list[str]:
    """Non-blank lines of a few stdlib modules (~150 KB) and some odd ones: the test corpus."""
    lines = []
    for name in SOURCES:  # cut at newlines only, as the text dataset reads a file
        text = (STDLIB / name).read_text(encoding="utf-8")
        assert "\r" not in text
        lines += [line for line in text.split("\n") if line.strip()]
    return lines + ODD


@pytest.fixture(scope="module", autouse=True)
def _parallelism_put_back():
    """Training sets TOKENIZERS_PARALLELISM for the process (see the plugin); other test modules
    get the environment as it was."""
    before = os.environ.get(PARALLELISM)
    yield
    if before is None:
        os.environ.pop(PARALLELISM, None)
    else:
        os.environ[PARALLELISM] = before


@pytest.fixture(scope="module")
def docs():
    return stdlib_lines()


@pytest.fixture(scope="module")
def bpe_class(builtin_system):
    return builtin_system.registry.get("tokenizer", "bpe").factory


@pytest.fixture(scope="module")
def trained(bpe_class, docs):
    tok = bpe_class(vocab_size=600)
    tok.fit_documents(iter(docs))
    return tok


@pytest.fixture
def clean_parallelism(monkeypatch):
    """TOKENIZERS_PARALLELISM unset for the test, and put back as it was afterwards."""
    monkeypatch.setenv(PARALLELISM, "unset")  # records the original value for teardown
    monkeypatch.delenv(PARALLELISM)


# -- encoding ---------------------------------------------------------------------------------------
def test_any_text_round_trips(trained, docs):
    for text in SAMPLES + docs[:300] + ODD:
        ids = trained.encode(text)
        assert trained.decode(ids) == text, text
        assert all(0 <= i < trained.vocab_size for i in ids)


def test_vocabulary_keeps_to_vocab_size(bpe_class, trained, docs):
    assert trained.vocab_size == 600  # the corpus has enough pairs for every merge asked for
    assert trained.eot_id is not None and 0 <= trained.eot_id < trained.vocab_size
    fresh = bpe_class(vocab_size=1000)
    assert fresh.vocab_size == 1000 and fresh.eot_id is None  # the size asked for, until trained
    tiny = bpe_class(vocab_size=5000)
    tiny.fit("abab abab cdcd")  # few pairs: fewer tokens than asked for, all bytes still there
    assert 258 <= tiny.vocab_size < 5000
    assert tiny.decode(tiny.encode("zebra 😀 abab")) == "zebra 😀 abab"
    vocab = json.loads(tiny.state_dict()["tokenizer_json"])["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(tiny.vocab_size))  # the real count, ids 0..n-1


def test_end_of_text_is_special_and_its_text_is_not(trained):
    eot = trained.eot_id
    assert trained.decode([eot]) == EOT
    assert trained.token_bytes([eot]) == [0]
    for text in (EOT, f"a {EOT} b", f"{EOT}{EOT}", "a literal <|endoftext|> inside a line"):
        ids = trained.encode(text)
        assert eot not in ids, text
        assert trained.decode(ids) == text
        assert all(eot not in ids for ids in trained.encode_batch([text, text]))
    ids = trained.encode("one") + [eot] + trained.encode("two")
    assert trained.decode(ids) == f"one{EOT}two"
    trained.add_eot()  # nothing to add: the id is the trained one
    assert trained.eot_id == eot


def test_encode_before_training_says_so(bpe_class):
    tok = bpe_class(vocab_size=300)
    for call in (lambda: tok.encode("x"), lambda: tok.encode_batch(["x"]), lambda: tok.decode([1])):
        with pytest.raises(ConfigError, match="must be trained first") as info:
            call()
        assert "\n" not in str(info.value)
    assert tok.state_dict() == {}


def test_encode_batch_equals_encode(trained, docs):
    texts = SAMPLES + docs[:500]
    batch = trained.encode_batch(texts)
    assert len(batch) == len(texts)
    for text, ids in zip(texts, batch):
        assert list(np.asarray(ids)) == trained.encode(text)
    assert trained.encode_batch([]) == []


def test_token_bytes_add_up_to_the_text(trained, docs):
    for text in SAMPLES + docs[:200]:
        ids = trained.encode(text)
        sizes = trained.token_bytes(ids)
        assert sum(sizes) == len(text.encode("utf-8")), text
        assert all(s >= 1 for s in sizes)
    every = trained.token_bytes(range(trained.vocab_size))
    assert every.count(0) == 1 and max(every) > 1


# -- training and state -----------------------------------------------------------------------------
def test_training_is_reproducible(bpe_class, trained, docs):
    again = bpe_class(vocab_size=600)
    again.fit_documents(iter(docs))
    assert again.state_dict() == trained.state_dict()
    other = bpe_class(vocab_size=600, min_frequency=50)
    other.fit_documents(iter(docs))
    assert other.state_dict() != trained.state_dict()


def test_state_round_trips_through_json(bpe_class, trained, docs):
    state = json.loads(json.dumps(trained.state_dict()))
    restored = bpe_class(vocab_size=9999)  # the options do not matter once the state is loaded
    restored.load_state_dict(state)
    assert restored.vocab_size == trained.vocab_size and restored.eot_id == trained.eot_id
    assert restored.state_dict() == trained.state_dict()
    for text in SAMPLES + docs[:200]:
        assert restored.encode(text) == trained.encode(text)
    assert restored.token_bytes(range(restored.vocab_size)) == trained.token_bytes(range(trained.vocab_size))


def test_training_stops_at_max_train_chars(bpe_class, docs):
    seen = []

    def stream():
        for doc in docs:
            seen.append(doc)
            yield doc

    tok = bpe_class(vocab_size=600, max_train_chars=2000)
    tok.fit_documents(stream())
    assert sum(len(d) for d in seen[:-1]) < 2000 and len(seen) < len(docs)  # stopped reading early
    capped = bpe_class(vocab_size=600, max_train_chars=2000)
    head, total = [], 0
    for doc in docs:
        head.append(doc[:2000 - total])
        total += len(head[-1])
        if total >= 2000:
            break
    capped.fit_documents(iter(head))
    assert capped.state_dict() == tok.state_dict()  # what it saw: the first 2000 characters
    assert tok.decode(tok.encode(docs[-1])) == docs[-1]


# -- forked workers ---------------------------------------------------------------------------------
_FORKED = {}


def _encode_in_child(texts):
    return [list(map(int, ids)) for ids in _FORKED["tok"].encode_batch(texts)]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
@pytest.mark.parametrize("user_setting", [None, "true"])
def test_forked_worker_encodes_like_the_parent(bpe_class, docs, capfd, monkeypatch, clean_parallelism,
                                               user_setting):
    """Trained in the parent (the library's threads ran), then encode_batch in a forked child, as
    the preparation workers do: same ids, nothing printed, no hang, even when the user asked the
    library for threads."""
    if user_setting is not None:
        monkeypatch.setenv(PARALLELISM, user_setting)
    tok = bpe_class(vocab_size=600)
    tok.fit_documents(iter(docs * 3))
    texts = docs * 2
    parent = [list(map(int, ids)) for ids in tok.encode_batch(texts)]
    if user_setting is None:
        assert os.environ.get(PARALLELISM) == "false"  # said before any fork
    _FORKED["tok"] = tok
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_encode_in_child, (texts,)).get(timeout=120)
    finally:
        _FORKED.clear()
    assert child == parent
    out, err = capfd.readouterr()
    assert "tokenizers" not in err and "fork" not in err, err
    assert "tokenizers" not in out and "fork" not in out, out


# -- options and the extra --------------------------------------------------------------------------
def spec(**options):
    return parse_section(DataConfig, {"dataset": "python_docs", "tokenizer": {"name": "bpe", **options}},
                         "data").tokenizer


@pytest.mark.parametrize("options, words", [
    ({"vocab_size": 100}, ["data.tokenizer.vocab_size", "258", "100"]),
    ({"vocab_size": 257}, ["data.tokenizer.vocab_size", "258"]),
    ({"vocab_size": "big"}, ["vocab_size", "integer"]),
    ({"min_frequency": -1}, ["min_frequency", ">= 0"]),
    ({"max_train_chars": 0}, ["max_train_chars", ">= 1"]),
    ({"vocab_sise": 500}, ["vocab_sise", "vocab_size"]),
])
def test_bad_options_fail_in_one_line(builtin_system, options, words):
    with pytest.raises(ConfigError) as info:
        build_tokenizer(spec(**options), builtin_system)
    message = str(info.value)
    assert "\n" not in message and "bpe" in message
    assert all(w in message for w in words), message


def test_bad_vocab_size_from_the_command_line(capsys, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(stdlib_lines()[:50]) + "\n")
    exp = write_lab(tmp_path, {"name": "b", "model": {"preset": "nano", "vocab_size": 512},
                               "data": {"dataset": {"name": "text", "path": "corpus.txt", "documents": "line"},
                                        "tokenizer": {"name": "bpe", "vocab_size": 100}},
                               "variants": {"a": {}}, "seeds": [0]})
    rc, out, err = run_cli(capsys, "prepare", exp, "--results-dir", tmp_path / "r")
    one_line_error(rc, err, "data.tokenizer.vocab_size", "258")


def test_missing_package_names_the_extra(builtin_system, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ConfigError) as info:
        build_tokenizer(spec(vocab_size=500), builtin_system)
    message = str(info.value)
    assert "\n" not in message
    assert "data.tokenizer 'bpe'" in message and "tokenizers package" in message
    assert "pip install 'gptlab[bpe]'" in message


# -- end to end: a documents corpus prepared and cached ---------------------------------------------
def test_documents_corpus_prepared_once_and_cached(tmp_path, builtin_system, monkeypatch, clean_parallelism):
    lines = stdlib_lines()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = [line for line in lines if line.strip()]  # what documents: line gives back
    cfg = parse_section(DataConfig, {"dataset": {"name": "text", "path": str(path), "documents": "line"},
                                     "tokenizer": {"name": "bpe", "vocab_size": 400}, "workers": 2,
                                     "shard_tokens": 20000}, "data")
    first = prepare_tokens(cfg, builtin_system, tmp_path / "cache")
    tok = first.tokenizer
    assert tok.vocab_size == 400 and first.manifest["vocab_size"] == 400
    assert first.manifest["eot_id"] == tok.eot_id and first.manifest["dtype"] == "uint16"
    val = [d for d in docs if shards.in_validation(d.encode("utf-8"), cfg.val_fraction)]
    train = [d for d in docs if not shards.in_validation(d.encode("utf-8"), cfg.val_fraction)]
    assert val and train
    for tokens, split in ((first.train, train), (first.val, val)):
        ids = np.asarray(tokens[0:len(tokens)])
        assert int((ids == tok.eot_id).sum()) == len(split)  # one end-of-text per document, none from text
        assert tok.decode(ids.tolist()) == "".join(d + EOT for d in split)

    # a second call reads the cache: nothing is trained again, the state comes from the manifest
    kind = type(tok)
    monkeypatch.setattr(kind, "fit_documents", lambda self, documents: pytest.fail("trained again"))
    second = prepare_tokens(cfg, builtin_system, tmp_path / "cache")
    assert second.manifest == first.manifest
    assert second.tokenizer is not tok and second.tokenizer.state_dict() == tok.state_dict()
    assert np.array_equal(np.asarray(second.train[0:len(second.train)]), np.asarray(first.train[0:len(first.train)]))
    for text in SAMPLES + docs[:100]:
        assert second.tokenizer.encode(text) == tok.encode(text)
