"""Dataset 'jsonl': JSON Lines files streamed as documents, with the standard library alone. The
documents are the lines' text fields in file order; a bad line is one error naming file:line; the
fingerprint follows the files; relative paths start at the experiment's folder; and the tokens
prepared from it are each document's bytes followed by end-of-text, split by hash or by val_path."""
from __future__ import annotations

import gzip
import inspect
import json
import os

import numpy as np
import pytest

from gptlab.config.model import parse_section
from gptlab.config.run import DataConfig
from gptlab.data.prepare import in_validation
from gptlab.data.tokens import prepare_tokens
from gptlab.errors import ConfigError
from gptlab.plugin.contract import EXPERIMENT_DIR
from gptlab.plugin.manager import default_plugins

EOT = 256


@pytest.fixture(scope="module")
def jsonl():
    return default_plugins().registry.get("dataset", "jsonl").factory


def write(path, rows, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return path


def docs(n, tag=""):
    return [f"document {tag}{i}: é ✓ " + "word " * (i % 7) for i in range(n)]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        result = fn(*args, **kwargs)
        list(result.documents()) if hasattr(result, "documents") else list(result)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_documents_are_the_text_fields_in_order(tmp_path, jsonl):
    first, second = docs(5, "a"), docs(4, "b")
    write(tmp_path / "d" / "1.jsonl", [{"text": d, "id": i} for i, d in enumerate(first)][:3] + [""]
          + [{"text": d} for d in first[3:]] + ["   "])
    write(tmp_path / "d" / "2.jsonl.gz", [{"text": d} for d in second], opener=gzip.open)
    write(tmp_path / "d" / "notes.txt", ["not a corpus"])
    corpus = jsonl(str(tmp_path / "d"))  # a folder: its .jsonl and .jsonl.gz files, sorted
    assert list(corpus.documents()) == first + second and corpus.val_documents is None
    assert list(jsonl(str(tmp_path / "d" / "*.jsonl*")).documents()) == first + second  # a glob
    assert list(jsonl([str(tmp_path / "d" / "2.jsonl.gz"), str(tmp_path / "d" / "1.jsonl")]).documents()) \
        == second + first  # a list keeps its order
    assert list(corpus.documents()) == first + second  # read again from the start


def test_text_field_and_gzip_by_content(tmp_path, jsonl):
    rows = [{"body": d, "text": 1} for d in docs(3)]
    write(tmp_path / "x.json.gz", rows, opener=gzip.open)
    write(tmp_path / "y.data", rows, opener=gzip.open)  # gzip recognised by its first bytes
    assert list(jsonl(str(tmp_path / "x.json.gz"), text_field="body").documents()) == docs(3)
    assert list(jsonl(str(tmp_path / "y.data"), text_field="body").documents()) == docs(3)


def test_val_path_gives_the_sources_own_validation(tmp_path, jsonl):
    write(tmp_path / "train.jsonl", [{"text": d} for d in docs(6, "t")])
    write(tmp_path / "val.jsonl", [{"text": d} for d in docs(2, "v")])
    corpus = jsonl(str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"))
    assert list(corpus.documents()) == docs(6, "t") and list(corpus.val_documents()) == docs(2, "v")


def test_documents_are_read_lazily(tmp_path, jsonl, monkeypatch):
    big = write(tmp_path / "big.jsonl", [{"text": "x" * 2000 + str(i)} for i in range(4000)])  # ~8 MB
    opened = []

    def spy(*args, **kwargs):
        opened.append(open(*args, **kwargs))
        return opened[-1]

    corpus = jsonl(str(big))
    monkeypatch.setitem(jsonl.__globals__, "open", spy)  # the globals the plugin's functions read
    stream = corpus.documents()
    assert inspect.isgenerator(stream)
    assert next(stream) == "x" * 2000 + "0"
    size = os.path.getsize(big)
    assert len(opened) == 1 and opened[0].tell() <= size // 4  # one buffered block read, not the file
    stream.close()
    assert opened[0].closed


def test_fingerprint_follows_the_files(tmp_path, jsonl):
    path = write(tmp_path / "a.jsonl", [{"text": d} for d in docs(3)])
    first = jsonl(str(path)).fingerprint
    assert jsonl(str(path)).fingerprint == first  # equal input, equal fingerprint
    assert jsonl(str(path), text_field="text").fingerprint == first
    write(tmp_path / "a.jsonl", [{"text": d} for d in docs(3, "z")])
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a new modification time even on coarse clocks
    changed = jsonl(str(path)).fingerprint
    assert changed != first
    write(tmp_path / "b.jsonl", [{"body": "b", "text": "t"}])
    other = str(tmp_path / "b.jsonl")
    assert jsonl(other).fingerprint != jsonl(other, text_field="body").fingerprint
    with_val = jsonl(str(path), val_path=str(tmp_path / "b.jsonl")).fingerprint
    assert with_val != changed


@pytest.mark.parametrize("line, words", [
    ("{not json", ["is not JSON", "Expecting"]),
    ('["a list"]', ["is an array, not a JSON object"]),
    ('{"txt": "a"}', ["has no field 'text'", "did you mean 'txt'?", "data.dataset.text_field"]),
    ('{"text": 3}', ["field 'text' holding a number, not a string", "data.dataset.text_field"]),
    ('{"text": null}', ["holding null, not a string"]),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, jsonl, line, words):
    path = write(tmp_path / "c.jsonl", ['{"text": "fine"}', "", line, '{"text": "never read"}'])
    message = error_of(jsonl, str(path))  # found while reading: the dataset named first
    assert message.startswith("data.dataset 'jsonl': ")
    assert f"{path}:3 (data.dataset.path)" in message
    assert all(w in message for w in words), message
    val = write(tmp_path / "v.jsonl", [line])  # the first line is checked when the dataset is built
    message = error_of(jsonl, str(tmp_path / "c.jsonl"), val_path=str(val))
    assert f"{val}:1 (data.dataset.val_path)" in message and all(w in message for w in words), message


def test_a_wrong_text_field_fails_when_the_dataset_is_built(tmp_path, jsonl):
    path = write(tmp_path / "c.jsonl", [{"content": "a", "id": 1}])
    with pytest.raises(ConfigError, match=r"c.jsonl:1 \(data.dataset.path\) has no field 'contents' "
                                          r"\(did you mean 'content'\?\) \(its fields: content, id\)"):
        jsonl(str(path), text_field="contents")


def test_a_damaged_gzip_file_is_one_error(tmp_path, jsonl):
    path = write(tmp_path / "c.jsonl.gz", [{"text": "y" * 50_000 + str(i)} for i in range(50)], opener=gzip.open)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    message = error_of(jsonl, str(path))
    assert "gzip file is damaged or cut short" in message and "data.dataset.path" in message


def test_paths_that_match_nothing(tmp_path, jsonl):
    message = error_of(jsonl, str(tmp_path / "none" / "*.jsonl"))
    assert "path '" in message and f"looked for {tmp_path / 'none' / '*.jsonl'}" in message
    assert message.endswith("fix data.dataset.path")
    (tmp_path / "empty").mkdir()
    message = error_of(jsonl, str(tmp_path / "empty"))
    assert "is a folder with no .jsonl" in message and str(tmp_path / "empty") in message
    write(tmp_path / "t.jsonl", [{"text": "a"}])
    message = error_of(jsonl, str(tmp_path / "t.jsonl"), val_path="missing.jsonl")
    assert "val_path 'missing.jsonl' matches no file" in message and "data.dataset.val_path" in message


def test_relative_paths_start_at_the_experiment_folder(tmp_path, jsonl, monkeypatch, capsys):
    lab = tmp_path / "lab"
    write(lab / "corpus" / "a.jsonl", [{"text": "from the lab"}])
    token = EXPERIMENT_DIR.set(lab)
    try:
        assert list(jsonl("corpus/*.jsonl").documents()) == ["from the lab"]
        assert capsys.readouterr().err == ""
        write(tmp_path / "cwd" / "old" / "b.jsonl", [{"text": "from the cwd"}])
        monkeypatch.chdir(tmp_path / "cwd")  # found only from the current directory: works, with a warning
        corpus = jsonl("old/b.jsonl")
        assert list(corpus.documents()) == ["from the cwd"]
        err = capsys.readouterr().err
        assert "warning: data.dataset.path 'old/b.jsonl' was found from the current directory" in err
        assert "'../cwd/old/b.jsonl'" in err  # the form relative to the experiment's folder
        message = error_of(jsonl, "nowhere.jsonl")
        assert f"looked for {lab / 'nowhere.jsonl'}" in message
    finally:
        EXPERIMENT_DIR.reset(token)


def data_config(**dataset) -> DataConfig:
    return parse_section(DataConfig, {"dataset": {"name": "jsonl", **dataset}, "tokenizer": "bytes", "workers": 1},
                         "data")


def reference(documents):
    return np.array([t for d in documents for t in [*d.encode("utf-8"), EOT]], dtype=np.uint16)


def test_prepared_tokens_are_each_documents_bytes_then_end_of_text(tmp_path):
    corpus = docs(300, "e2e")
    write(tmp_path / "lab" / "corpus.jsonl", [{"text": d} for d in corpus])
    got = prepare_tokens(data_config(path="corpus.jsonl"), default_plugins(), tmp_path / "cache",
                         base_dir=tmp_path / "lab")
    val = [d for d in corpus if in_validation(d.encode("utf-8"), 0.1)]
    train = [d for d in corpus if not in_validation(d.encode("utf-8"), 0.1)]
    assert val and train
    assert np.array_equal(np.asarray(got.train[0:len(got.train)]), reference(train))
    assert np.array_equal(np.asarray(got.val[0:len(got.val)]), reference(val))
    write(tmp_path / "lab" / "held.jsonl", [{"text": d} for d in docs(5, "held")])
    own = prepare_tokens(data_config(path="corpus.jsonl", val_path="held.jsonl"), default_plugins(),
                         tmp_path / "cache", base_dir=tmp_path / "lab")
    assert np.array_equal(np.asarray(own.train[0:len(own.train)]), reference(corpus))
    assert np.array_equal(np.asarray(own.val[0:len(own.val)]), reference(docs(5, "held")))
    assert own.manifest["split"] == {"rule": "source"}
