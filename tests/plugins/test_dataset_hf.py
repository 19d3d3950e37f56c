"""Dataset 'hf': Hugging Face ``datasets`` sources read as documents, tested on small local files
that ``datasets`` itself writes (save_to_disk, parquet, JSON Lines): never the network, and the
library's cache kept in tmp_path. Documents keep their order and are read in batches; splits come
from the source; errors are one line naming the key; the fingerprint follows the files."""
from __future__ import annotations

import inspect
import os
import sys
import time
import tracemalloc

import numpy as np
import pytest

from gptlab.config.model import parse_section
from gptlab.config.run import DataConfig
from gptlab.data.prepare import in_validation
from gptlab.data.tokens import build_corpus, prepare_tokens
from gptlab.errors import ConfigError
from gptlab.plugin.contract import EXPERIMENT_DIR
from gptlab.plugin.manager import default_plugins

EOT = 256


@pytest.fixture(scope="module")
def hf():
    return default_plugins().registry.get("dataset", "hf").factory


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """The datasets package, offline, its cache in tmp_path (nothing written under $HOME)."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield datasets
    if shown:
        datasets.enable_progress_bars()


def texts(n, tag=""):
    return [f"row {tag}{i}: ü ✓ " + "token " * (i % 5) for i in range(n)]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        list(fn(*args, **kwargs).documents())
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_save_to_disk_dataset(tmp_path, datasets, hf):
    rows = texts(7)
    datasets.Dataset.from_dict({"text": rows[:3] + [None] + rows[3:], "n": list(range(8))}).save_to_disk(
        str(tmp_path / "saved"))
    corpus = hf(str(tmp_path / "saved"))
    assert list(corpus.documents()) == rows  # in order; a null text is skipped
    assert corpus.val_documents is None
    message = error_of(hf, str(tmp_path / "saved"), val_split="validation")
    assert "val_split 'validation' is not a split of the saved dataset" in message and "(splits: train)" in message


def test_a_dataset_dict_folder_gives_its_own_validation(tmp_path, datasets, hf):
    train, val = texts(6, "t"), texts(3, "v")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": val})}).save_to_disk(str(tmp_path / "dd"))
    corpus = hf(str(tmp_path / "dd"), val_split="validation")
    assert list(corpus.documents()) == train and list(corpus.val_documents()) == val
    assert list(hf(str(tmp_path / "dd"), split="validation").documents()) == val


def test_parquet_and_jsonl_files(tmp_path, datasets, hf):
    first, second = texts(5, "a"), texts(4, "b")
    datasets.Dataset.from_dict({"body": first}).to_parquet(str(tmp_path / "p" / "part-0.parquet"))
    datasets.Dataset.from_dict({"body": second}).to_parquet(str(tmp_path / "p" / "part-1.parquet"))
    assert list(hf(str(tmp_path / "p" / "part-0.parquet"), text_field="body").documents()) == first
    assert list(hf(str(tmp_path / "p" / "*.parquet"), text_field="body").documents()) == first + second
    datasets.Dataset.from_dict({"text": first, "id": list(range(5))}).to_json(str(tmp_path / "j.jsonl"))
    assert list(hf(str(tmp_path / "j.jsonl")).documents()) == first
    assert list(hf(str(tmp_path / "j.jsonl"), streaming=True).documents()) == first  # read without a cache


def test_a_folder_of_data_files_split_by_name(tmp_path, datasets, hf):
    datasets.Dataset.from_dict({"text": texts(4, "t")}).to_parquet(str(tmp_path / "d" / "train.parquet"))
    datasets.Dataset.from_dict({"text": texts(2, "v")}).to_parquet(str(tmp_path / "d" / "validation.parquet"))
    corpus = hf(str(tmp_path / "d"), val_split="validation")
    assert list(corpus.documents()) == texts(4, "t") and list(corpus.val_documents()) == texts(2, "v")


def test_documents_are_read_in_batches(tmp_path, datasets, hf):
    rows = ["y" * 400 + str(i) for i in range(20_000)]  # ~8 MB of text
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "big"))
    stream = hf(str(tmp_path / "big")).documents()
    assert inspect.isgenerator(stream)
    tracemalloc.start()
    try:
        assert next(stream) == rows[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # one batch of rows, not the column's 8 MB
    stream.close()


def test_fingerprint_follows_the_files(tmp_path, datasets, hf):
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"text": texts(3)}).to_parquet(str(path))
    first = hf(str(path)).fingerprint
    assert hf(str(path)).fingerprint == first
    assert hf(str(path), text_field="text").fingerprint == first
    datasets.Dataset.from_dict({"text": texts(3, "new")}).to_parquet(str(path))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert hf(str(path)).fingerprint != first
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts(3)}).save_to_disk(str(saved))
    before = hf(str(saved)).fingerprint
    assert hf(str(saved)).fingerprint == before
    time.sleep(0.01)
    datasets.Dataset.from_dict({"text": texts(4)}).save_to_disk(str(tmp_path / "other"))
    datasets.load_from_disk(str(tmp_path / "other")).save_to_disk(str(saved))  # rewritten in place
    assert hf(str(saved)).fingerprint != before


def test_errors_are_one_line_naming_the_key(tmp_path, datasets, hf):
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "n": [1], "story": ["s"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["b"], "n": [2], "story": ["t"]})}
                         ).save_to_disk(str(dd))
    message = error_of(hf, str(dd), split="trian")
    assert "split 'trian' is not a split" in message and "(did you mean 'train'?)" in message
    assert "(splits: train, validation)" in message and message.endswith("fix data.dataset.split")
    message = error_of(hf, str(dd), val_split="valid")
    assert "val_split 'valid'" in message and "did you mean 'validation'?" in message
    assert "data.dataset.val_split" in message
    message = error_of(hf, str(dd), text_field="stroy")
    assert "has no column 'stroy' (did you mean 'story'?) (columns: text, n, story)" in message
    assert message.endswith("set data.dataset.text_field")
    message = error_of(hf, str(dd), text_field="n")
    assert "column 'n'" in message and "holds int64, not strings" in message and "data.dataset.text_field" in message
    message = error_of(hf, str(dd), val_split="train")
    assert "also the training split" in message and "data.dataset.val_split" in message
    message = error_of(hf, str(tmp_path / "none" / "x.parquet"))
    assert f"matches no file or folder (looked for {tmp_path / 'none' / 'x.parquet'}" in message
    assert message.endswith("fix data.dataset.path")
    message = error_of(hf, str(dd), subset="default")
    assert "'" + str(dd) + "' is local" in message and "drop data.dataset.subset" in message
    (tmp_path / "notes.txt").write_text("text")
    message = error_of(hf, str(tmp_path / "notes.txt"))
    assert "files ending '.txt'" in message and "data.dataset.path" in message


def test_a_hub_name_without_network(tmp_path, datasets, hf):
    started = time.perf_counter()
    message = error_of(hf, "someone/no-such-corpus", split="train")
    assert time.perf_counter() - started < 10  # offline: no retries against the network
    assert "cannot reach the Hugging Face hub to load 'someone/no-such-corpus'" in message
    assert "save_to_disk folder or data files" in message and "data.dataset.path" in message
    # the hub config is the option subset: data.dataset's own name key chooses the plugin
    cfg = data_config(path="someone/no-such-corpus", subset="en", revision="v1", streaming=True)
    with pytest.raises(ConfigError, match=r"^data.dataset 'hf': this machine cannot reach the Hugging Face hub"):
        build_corpus(cfg, default_plugins())


def test_without_the_datasets_package(hf, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    message = error_of(hf, "roneneldan/TinyStories")
    assert "needs the datasets package" in message and 'pip install "gptlab[datasets]"' in message


def test_relative_paths_start_at_the_experiment_folder(tmp_path, datasets, hf, monkeypatch, capsys):
    lab = tmp_path / "lab"
    datasets.Dataset.from_dict({"text": ["from the lab"]}).to_parquet(str(lab / "data" / "a.parquet"))
    datasets.Dataset.from_dict({"text": ["from the cwd"]}).to_parquet(str(tmp_path / "cwd" / "old.parquet"))
    token = EXPERIMENT_DIR.set(lab)
    try:
        assert list(hf("data/a.parquet").documents()) == ["from the lab"]
        assert "warning" not in capsys.readouterr().err
        monkeypatch.chdir(tmp_path / "cwd")
        assert list(hf("old.parquet").documents()) == ["from the cwd"]
        err = capsys.readouterr().err
        assert "data.dataset.path 'old.parquet' was found from the current directory" in err
        assert "'../cwd/old.parquet'" in err
    finally:
        EXPERIMENT_DIR.reset(token)


def data_config(**dataset) -> DataConfig:
    return parse_section(DataConfig, {"dataset": {"name": "hf", **dataset}, "tokenizer": "bytes", "workers": 1},
                         "data")


def reference(documents):
    return np.array([t for d in documents for t in [*d.encode("utf-8"), EOT]], dtype=np.uint16)


def as_array(tokens):
    return np.asarray(tokens[0:len(tokens)])


def test_prepared_tokens_are_each_documents_bytes_then_end_of_text(tmp_path, datasets):
    rows = texts(300, "e2e")
    lab = tmp_path / "lab"
    datasets.Dataset.from_dict({"text": rows}).to_parquet(str(lab / "corpus.parquet"))
    got = prepare_tokens(data_config(path="corpus.parquet"), default_plugins(), tmp_path / "cache", base_dir=lab)
    val = [d for d in rows if in_validation(d.encode("utf-8"), 0.1)]
    train = [d for d in rows if not in_validation(d.encode("utf-8"), 0.1)]
    assert val and train
    assert np.array_equal(as_array(got.train), reference(train)) and np.array_equal(as_array(got.val), reference(val))
    held = texts(4, "held")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows}),
                          "validation": datasets.Dataset.from_dict({"text": held})}).save_to_disk(str(lab / "dd"))
    own = prepare_tokens(data_config(path="dd", val_split="validation"), default_plugins(), tmp_path / "cache",
                         base_dir=lab)
    assert np.array_equal(as_array(own.train), reference(rows)) and np.array_equal(as_array(own.val), reference(held))
    assert own.manifest["split"] == {"rule": "source"}
