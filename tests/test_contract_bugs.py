"""Two contract bugs, each pinned by behaviour:

1. ``model: {from_hf: DIR}`` resolves its importer in the plugin system the experiment runs with,
   so an importer listed under the experiment's own ``plugins:`` reads the checkpoint (and parsing
   builds no second, process-wide plugin system on the way).
2. ``CausalSelfAttention`` declares only what the base class applies (the rotation): a subclass
   whose ``attend`` ignores ``ctx.score_bias`` is refused with ALiBi instead of silently dropping
   the bias, while the built-in attentions declare, and apply, the score bias.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import gptlab
from gptlab import GPTModel
from gptlab.plugin.manager import build_plugin_system

from conftest import TINY, build, clone_into, randomize_, run_cli, write_plugin

# ---------------------------------------------------------------------------------------------
# 1. an importer from the experiment's own plugins: list
# ---------------------------------------------------------------------------------------------

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
def lab(tmp_path, monkeypatch):
    """A folder holding a 'mygpt' checkpoint, the plugin that reads it and a small corpus."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    torch.manual_seed(0)
    model = randomize_(GPTModel(MYGPT_CONFIG), seed=3)
    assert model.save_hf(tmp_path / "ckpt") == "gpt2"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "model_type": "mygpt"}))
    write_plugin(tmp_path, "import_mygpt.py", MYGPT_PLUGIN)
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    return tmp_path


def write_experiment(lab: Path, plugins: list) -> Path:
    doc = {"name": "mygpt", "plugins": plugins, "model": {"from_hf": "ckpt"},
           "data": {"dataset": {"name": "text", "path": str(lab / "corpus.txt")}, "tokenizer": "bytes"},
           "train": TRAIN, "seeds": [0]}
    path = lab / "exp.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


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


# ---------------------------------------------------------------------------------------------
# 2. score_bias is declared by an attention that applies it, never by default
# ---------------------------------------------------------------------------------------------

DEAF_ATTENTION = '''
    """Attention 'deaf': causal SDPA that never looks at ctx.score_bias (and declares nothing)."""
    import torch.nn.functional as F

    import gptlab
    from gptlab import CausalSelfAttention


    class DeafAttention(CausalSelfAttention):
        """Causal SDPA; the rotation is applied by the base class, a score bias by nobody."""

        def attend(self, q, k, v, ctx):
            return F.scaled_dot_product_attention(q, self.expand_kv(k), self.expand_kv(v), is_causal=True)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "deaf", DeafAttention)
'''


def test_an_attention_that_ignores_the_score_bias_is_refused_with_alibi(tmp_path):
    write_plugin(tmp_path, "deaf.py", DEAF_ATTENTION)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    with pytest.raises(gptlab.IncompatibleComponents) as err:
        build(system, attention="deaf", position="alibi")
    assert str(err.value) == ("position 'alibi' needs an attention that applies its score_bias, but attention "
                              "'deaf' accepts rotation; pick another attention or position")
    # what the base class does apply is still declared: rope's rotation works with it
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rope = randomize_(build(system, attention="deaf", position="rope"), seed=1).eval()
        flat = clone_into(rope, build(system, attention="deaf", position="none")).eval()
        assert (rope(idx) - flat(idx)).abs().max() > 1e-2


@pytest.mark.parametrize("attention", ["vanilla", "sdpa"])
def test_the_built_in_attentions_declare_and_apply_the_score_bias(attention):
    assert "score_bias" in gptlab.default_plugins().registry.get("attention", attention).factory.accepts
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alibi = randomize_(build(attention=attention, position="alibi"), seed=1).eval()
        plain = clone_into(alibi, build(attention=attention, position="none")).eval()
        reference = clone_into(alibi, build(attention="vanilla", position="alibi")).eval()
        assert (alibi(idx) - plain(idx)).abs().max() > 1e-2  # the bias changes the output
        torch.testing.assert_close(alibi(idx), reference(idx), atol=1e-5, rtol=0)  # the same bias as vanilla's
