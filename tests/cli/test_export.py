"""Trained runs out to Hugging Face (`gptlab export`), and pretrained weights in to an experiment
(`model: {from_hf: DIR}`), end to end through the command line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gptlab import GPTModel

import transformers  # noqa: E402  (the dev extra; CI installs it)

from helpers import write_lab

TRAIN = dict(steps=4, batch_size=2, eval_every=4, eval_batches=1, log_every=2, seq_len=16, checkpoint=True)
DATA = {"dataset": "python_docs", "tokenizer": "bytes"}


def experiment(tmp_path: Path, model: dict, variants: dict, train: dict = TRAIN) -> Path:
    doc = {"name": "exp", "model": model, "data": DATA, "train": dict(train), "variants": variants, "seeds": [0]}
    return write_lab(tmp_path, doc)


def runs(tmp_path: Path) -> dict[str, Path]:
    exp = tmp_path / "results" / "exp"
    return {p.name.split("__")[0]: p for p in sorted(exp.iterdir()) if p.is_dir()} if exp.is_dir() else {}


def greedy_matches(ours: GPTModel, theirs, prompt: torch.Tensor, n: int = 8) -> None:
    mine = ours.generate(prompt, n, temperature=0)
    ref = theirs.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine, ref)
    assert torch.equal(mine, ours.generate(prompt, n, temperature=0, use_cache=False))


def test_a_trained_default_run_exports_as_gpt2(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # gptlab's own defaults (qkv_bias false, exact GELU) on the nano size, trained a few steps
    path = experiment(tmp_path, {"preset": "nano"}, {"base": {}})
    assert cli("run", path, "--quiet")[0] == 0
    run = runs(tmp_path)["base"]
    code, out, err = cli("export", run, "--format", "hf", tmp_path / "hf")  # the form the README gives
    assert code == 0, err
    assert "(gpt2)" in out
    ours = GPTModel.from_run(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    # the missing q/k/v biases are written as zeros, which computes the same function
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert not written["transformer.h.0.attn.c_attn.bias"].any()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=0)
    greedy_matches(ours, theirs, idx[:, :5])


def test_a_run_that_maps_to_no_family_is_refused_naming_the_component(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = experiment(tmp_path, {"preset": "nano", "norm_placement": "sandwich"}, {"sandwich": {}},
                      train={**TRAIN, "steps": 2, "eval_every": 2})
    assert cli("run", path, "--quiet")[0] == 0
    code, _, err = cli("export", runs(tmp_path)["sandwich"], tmp_path / "hf")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "maps to no Hugging Face family" in err and "norm_placement 'sandwich'" in err
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_export_never_writes_into_a_used_directory(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = experiment(tmp_path, {"preset": "nano"}, {"base": {}}, train={**TRAIN, "steps": 2, "eval_every": 2})
    assert cli("run", path, "--quiet")[0] == 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = cli("export", runs(tmp_path)["base"], out)
    assert code == 2 and "not an empty directory" in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = cli("export", tmp_path / "nowhere", tmp_path / "hf2")
    assert code == 2 and "not a run directory" in err


# ---------------------------------------------------------------------------------------------
# model: {from_hf: DIR}
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def llama_dir(tmp_path, capsys):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # transformers' progress bars are not the command's output
    return tmp_path / "llama"


def test_an_experiment_starts_from_pretrained_weights_and_ablates_a_component(tmp_path, cli, llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # lr so small that the trained weights must still equal the checkpoint's
    train = {**TRAIN, "lr": 1e-9, "min_lr": 0.0, "weight_decay": 0.0}
    path = experiment(tmp_path, {"from_hf": "llama"},
                      {"pretrained": {}, "vanilla": {"model": {"attention": {"name": "vanilla", "n_kv_heads": 2}}}},
                      train=train)
    code, out, err = cli("run", path, "--quiet")
    assert code == 0, err
    found = runs(tmp_path)
    reference = GPTModel.from_hf(llama_dir)
    for variant in ("pretrained", "vanilla"):
        config = yaml.safe_load((found[variant] / "config.yaml").read_text())
        assert config["model"]["from_hf"] == "llama"
        assert config["model"]["norm"] == {"name": "rmsnorm", "eps": 1e-6}  # the checkpoint's architecture
        assert config["model"]["activation"] == "swiglu" and config["model"]["ff_dim"] == 48
        trained = GPTModel.from_run(found[variant])
        for (name, a), (_, b) in zip(trained.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m: f"{variant} {name}: {m}")
    # the same architecture from scratch is far from the checkpoint
    scratch = experiment(tmp_path, {**reference.config.to_dict()}, {"scratch": {}}, train=train)
    assert cli("run", scratch, "--quiet")[0] == 0
    fresh = GPTModel.from_run(runs(tmp_path)["scratch"])
    assert (fresh.tok_emb.weight - reference.tok_emb.weight).abs().max() > 0.1


def test_a_variant_whose_weights_do_not_fit_is_refused_before_training(tmp_path, cli, llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = experiment(tmp_path, {"from_hf": "llama"}, {"plain_mlp": {"model": {"activation": "gelu"}}})
    for extra in (["--dry-run"], []):
        code, _, err = cli("run", path, "--quiet", *extra)
        assert code == 2
        assert len(err.strip().splitlines()) == 1
        assert "variant 'plain_mlp'" in err and "mlp.up_proj.weight" in err and "whose shape is (48, 32)" in err
        assert runs(tmp_path) == {}


@pytest.mark.parametrize("model, words", [
    ({"from_hf": "llama", "preset": "nano"}, "set preset (nano) or from_hf (llama), not both"),
    ({"from_hf": "missing"}, "missing: not a directory"),
])
def test_from_hf_mistakes_are_one_line_errors(tmp_path, cli, llama_dir, monkeypatch, model, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("run", experiment(tmp_path, model, {"a": {}}), "--dry-run")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
