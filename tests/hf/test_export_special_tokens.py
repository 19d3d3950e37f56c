"""`gptlab export` writes bos/eos token ids that exist in the model's vocabulary, or null: the run's
own end-of-text token when its tokenizer has one, else the family's ids only inside the vocabulary
(a 256-token bytes model was written with GPT-2's 50256, and transformers warned)."""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import transformers  # noqa: E402  (the dev extra; CI installs it)
from transformers.utils import logging as hf_logging  # noqa: E402

import gptlab
from gptlab import GPTModel
from gptlab.hf.checkpoint import END_OF_TEXT, end_of_text_id, special_token_ids

from helpers import write_lab

TRAIN = dict(steps=2, batch_size=2, eval_every=2, eval_batches=1, log_every=2, seq_len=16, checkpoint=True)


def trained_run(tmp_path: Path, cli, tokenizer: str = "bytes", vocab_size: int = 256) -> Path:
    """A nano model trained 2 steps on python_docs with ``tokenizer``; its run directory."""
    doc = {"name": "exp", "model": {"preset": "nano", "vocab_size": vocab_size},
           "data": {"dataset": "python_docs", "tokenizer": tokenizer}, "train": TRAIN, "variants": {"base": {}},
           "seeds": [0]}
    code, _, err = cli("run", write_lab(tmp_path, doc), "--quiet")
    assert code == 0, err
    (run,) = [p for p in (tmp_path / "results" / "exp").iterdir() if p.is_dir()]
    return run


def written(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def load_with_transformers(out: Path):
    """The exported model as transformers loads it, and every warning it logged or raised meanwhile."""
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    hf_logging.warning_once.cache_clear()  # the token id warning is logged once per process otherwise
    logger, handler = logging.getLogger("transformers"), Keep(logging.WARNING)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = transformers.AutoModelForCausalLM.from_pretrained(out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return model, messages + [str(w.message) for w in caught]


def token_warnings(messages: list) -> list:
    return [m for m in messages if "token_id" in m]


def test_a_bytes_model_is_exported_without_special_tokens_and_loads_without_the_warning(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = trained_run(tmp_path, cli)
    code, out, err = cli("export", run, tmp_path / "hf")
    assert code == 0, err
    assert "(gpt2)" in out
    config = written(tmp_path / "hf")
    assert config["vocab_size"] == 256
    # written, as null: transformers' GPT2Config would otherwise assume 50256
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    theirs, messages = load_with_transformers(tmp_path / "hf")
    assert token_warnings(messages) == [], messages
    assert theirs.config.bos_token_id is None and theirs.config.eos_token_id is None
    assert theirs.generation_config.eos_token_id is None
    # gptlab reads the export back to the same model
    again = GPTModel.from_hf(tmp_path / "hf")
    assert again.config.vocab_size == 256

    # the check above can see the warning: the config export used to write gives it
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "hf", old)
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                 if k not in ("bos_token_id", "eos_token_id")}))
    _, messages = load_with_transformers(old)
    assert any("bos_token_id" in m and "50256" in m for m in messages), messages


def test_a_char_model_is_exported_with_its_end_of_text_token(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = trained_run(tmp_path, cli, tokenizer="char")
    state = json.loads((run / "tokenizer.json").read_text())["state"]
    eot = len(state["chars"])  # the char tokenizer's ids: its characters, then <|endoftext|>, then <|unk|>
    code, _, err = cli("export", run, tmp_path / "hf")
    assert code == 0, err
    config = written(tmp_path / "hf")
    assert config["bos_token_id"] == eot and config["eos_token_id"] == eot and eot < config["vocab_size"]
    theirs, messages = load_with_transformers(tmp_path / "hf")
    assert token_warnings(messages) == [], messages
    assert theirs.generation_config.eos_token_id == eot


def test_a_gpt2_sized_model_keeps_50256(tmp_path, cli, monkeypatch):
    """A 50257-token GPT-2 model: 50256 (GPT-2's <|endoftext|>) is inside its vocabulary and is kept."""
    torch.manual_seed(0)
    model = GPTModel({**gptlab.PRESETS["nano"], "vocab_size": 50257})
    assert model.save_hf(tmp_path / "code") == "gpt2"  # no run, no tokenizer: the family's ids
    config = written(tmp_path / "code")
    assert config["bos_token_id"] == 50256 and config["eos_token_id"] == 50256
    theirs, messages = load_with_transformers(tmp_path / "code")
    assert token_warnings(messages) == [], messages
    assert theirs.config.eos_token_id == 50256 and theirs.generation_config.eos_token_id == 50256

    # from a run whose tokenizer cannot be rebuilt (tokenizer.json gone): the family's ids, inside the vocabulary
    monkeypatch.chdir(tmp_path)
    run = trained_run(tmp_path, cli, vocab_size=50257)
    (run / "tokenizer.json").unlink()
    code, _, err = cli("export", run, tmp_path / "hf")
    assert code == 0, err
    config = written(tmp_path / "hf")
    assert config["bos_token_id"] == 50256 and config["eos_token_id"] == 50256


def test_a_small_model_built_in_code_is_exported_without_gpt2s_ids(tmp_path):
    model = GPTModel({**gptlab.PRESETS["nano"], "vocab_size": 256})
    model.save_hf(tmp_path)
    config = written(tmp_path)
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    _, messages = load_with_transformers(tmp_path)
    assert token_warnings(messages) == [], messages


def test_a_family_without_declared_ids_keeps_its_loader_defaults_inside_the_vocabulary(tmp_path):
    """Llama's to_hf declares no ids: with no tokenizer known nothing is written (transformers' 1 and 2
    apply, inside any vocabulary); with the run's tokenizer, its end-of-text token or null."""
    cfg = {**gptlab.PRESETS["nano"], "vocab_size": 256, "position": "rope", "norm": "rmsnorm",
           "activation": "swiglu", "bias": False}
    from gptlab.hf.checkpoint import export_hf

    GPTModel(cfg).save_hf(tmp_path / "plain")
    assert "bos_token_id" not in written(tmp_path / "plain") and "eos_token_id" not in written(tmp_path / "plain")
    _, messages = load_with_transformers(tmp_path / "plain")
    assert token_warnings(messages) == [], messages
    bytes_tok = gptlab.build_plugin_system().registry.get("tokenizer", "bytes").factory()
    assert export_hf(GPTModel(cfg), tmp_path / "bytes", tokenizer=bytes_tok) == "llama"
    config = written(tmp_path / "bytes")
    assert config["bos_token_id"] is None and config["eos_token_id"] is None


def test_end_of_text_ids_of_the_builtin_tokenizers():
    registry = gptlab.build_plugin_system().registry
    assert end_of_text_id(registry.get("tokenizer", "bytes").factory()) is None  # 13 bytes, no special
    char = registry.get("tokenizer", "char").factory()
    char.fit("hello world")
    assert end_of_text_id(char) == char.stoi[END_OF_TEXT] == len(set("helo wrd"))
    tiktoken_like = SimpleNamespace(encode=lambda text: [27, 91, 437], decode=lambda ids: "?",
                                    enc=SimpleNamespace(eot_token=50256))
    assert end_of_text_id(tiktoken_like) == 50256


@pytest.mark.parametrize("hf_config, tokenizer_eot, expected", [
    ({"vocab_size": 256, "bos_token_id": 50256, "eos_token_id": 50256}, "unknown",
     {"bos_token_id": None, "eos_token_id": None}),
    ({"vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}, "unknown",
     {"bos_token_id": 50256, "eos_token_id": 50256}),
    ({"vocab_size": 256}, "unknown", {}),  # nothing declared: nothing written
    ({"vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}, None,
     {"bos_token_id": None, "eos_token_id": None}),  # the run's tokenizer has no end-of-text token
    ({"vocab_size": 100, "bos_token_id": 50256}, 97, {"bos_token_id": 97, "eos_token_id": 97}),
    ({"vocab_size": 100}, 100, {"bos_token_id": None, "eos_token_id": None}),  # past the vocabulary
    ({"vocab_size": 100, "pad_token_id": -1, "sep_token_id": 5}, "unknown", {"pad_token_id": None}),
])
def test_special_token_ids(hf_config, tokenizer_eot, expected):
    if tokenizer_eot == "unknown":
        tokenizer = None
    else:
        tokenizer = SimpleNamespace(encode=lambda text: [tokenizer_eot] if tokenizer_eot is not None else [1, 2],
                                    decode=lambda ids: END_OF_TEXT)
    assert special_token_ids(hf_config, tokenizer) == expected
