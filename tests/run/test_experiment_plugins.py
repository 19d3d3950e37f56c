"""``model: {from_hf: DIR}`` resolves its importer in the plugin system the experiment runs with, so
an importer listed under the experiment's own ``plugins:`` reads the checkpoint (and parsing builds no
second, process-wide plugin system on the way)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gptlab import GPTModel
from gptlab.plugin.manager import build_plugin_system

from helpers import randomize_, run_cli, write_lab, write_plugin

MYGPT_PLUGIN = '''
    """Importer 'mygpt': GPT-2's layout under a model_type of its own."""
    import gptlab
    from gptlab.builtin_plugins.import_gpt2 import gpt2


    def mygpt(hf_config, source):
        """A GPT-2-shaped checkpoint whose config.json says model_type mygpt."""
        return gpt2(hf_config, source)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("importer", "mygpt", mygpt)
'''

# GPT-2's architecture at a size that trains in a blink; vocabulary 256 for the byte tokenizer
MYGPT_CONFIG = dict(vocab_size=256, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, activation="gelu_tanh")
TRAIN = dict(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, log_every=1, checkpoint=True,
             lr=1e-9, min_lr=0.0, weight_decay=0.0, warmup_steps=0)


@pytest.fixture
def lab(workdir):
    """A folder holding a 'mygpt' checkpoint, the plugin that reads it and a small corpus."""
    torch.manual_seed(0)
    model = randomize_(GPTModel(MYGPT_CONFIG), seed=3)
    assert model.save_hf(workdir / "ckpt") == "gpt2"
    config = json.loads((workdir / "ckpt" / "config.json").read_text())
    (workdir / "ckpt" / "config.json").write_text(json.dumps({**config, "model_type": "mygpt"}))
    write_plugin(workdir, "import_mygpt.py", MYGPT_PLUGIN)
    (workdir / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    return workdir


def write_experiment(lab: Path, plugins: list) -> Path:
    doc = {"name": "mygpt", "plugins": plugins, "model": {"from_hf": "ckpt"},
           "data": {"dataset": {"name": "text", "path": str(lab / "corpus.txt")}, "tokenizer": "bytes"},
           "train": TRAIN, "seeds": [0]}
    return write_lab(lab, doc)


def test_an_importer_listed_under_the_experiments_plugins_reads_its_from_hf(lab, capsys, monkeypatch):
    path = write_experiment(lab, ["import_mygpt.py"])
    code, out, err = run_cli(capsys, "run", path, "--dry-run")
    assert code == 0, err
    assert "mygpt: 1 runs (dry run, nothing trained)" in out

    # checking the experiment builds one plugin system, the one made with the experiment's plugins:
    # list; the process-wide default system is never asked for
    import gptlab.plugin.manager as pm

    built = []
    monkeypatch.setattr(pm, "build_plugin_system", lambda *a, **k: built.append(k) or build_plugin_system(*a, **k))

    def no_default():
        raise AssertionError("the process-wide default plugin system was asked for")

    monkeypatch.setattr(pm, "default_plugins", no_default)
    monkeypatch.setattr("gptlab.model.gpt.default_plugins", no_default)
    code, out, err = run_cli(capsys, "run", path, "--dry-run")
    assert code == 0, err
    assert "mygpt: 1 runs (dry run, nothing trained)" in out
    assert [(k["plugin_dirs"], k["extra"]) for k in built] == [([], ["import_mygpt.py"])]
    assert not (lab / "results").exists()  # a dry run writes nothing

    code, out, err = run_cli(capsys, "run", path, "--quiet")
    assert code == 0, err
    (run_dir,) = [p for p in (lab / "results" / "mygpt").iterdir() if p.is_dir()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["from_hf"] == "ckpt"
    assert config["model"]["qkv_bias"] is True and config["model"]["activation"] == "gelu_tanh"  # the checkpoint's
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    # the run started from the checkpoint's weights (lr 1e-9: two steps leave them where they were)
    system = build_plugin_system(plugin_dirs=[lab])
    reference = GPTModel.from_hf(lab / "ckpt", plugins=system).state_dict()
    trained = GPTModel.from_run(run_dir, plugins=system).state_dict()
    assert list(trained) == list(reference)
    for name, value in trained.items():
        torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def test_an_unknown_model_type_without_its_plugin_is_still_one_line_exit_2(lab, capsys):
    path = write_experiment(lab, [])
    for extra in (["--dry-run"], []):
        code, out, err = run_cli(capsys, "run", path, *extra)
        assert code == 2
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"gptlab: error: {path}: ckpt/config.json: no importer for model_type 'mygpt'; "
                              f"importers: bloom, gpt2, gpt_neox, llama, mistral, openai-gpt"), err
        assert "Traceback" not in err
    assert not (lab / "results").exists()
