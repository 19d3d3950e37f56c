"""The checks before training take one forward and backward pass of every variant's model.

A user plugin that builds but crashes in ``forward`` (or in ``backward``) is a one-line error naming
the variant and the plugin, with exit status 2, before anything trains or is written: under
``--dry-run`` and under a real ``gptlab run`` alike.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from gptlab.config.run import RunSpec, DataConfig, TrainConfig
from gptlab.config.model import ModelConfig
from gptlab.plugin.manager import build_plugin_system
from gptlab.run import preflight

from helpers import one_line_error, run_cli, tree_hash, write_lab

SHAPE_BUG = '''
import gptlab
from gptlab import CausalSelfAttention


class ShapeBug(CausalSelfAttention):
    """Attention whose attend multiplies q by k without the transpose."""

    def attend(self, q, k, v, ctx):
        return q @ k


@gptlab.hookimpl
def gptlab_register(register):
    register("attention", "shape_bug", ShapeBug)
'''

BACKWARD_BUG = '''
import torch
import gptlab
from gptlab import MLP


class _Fails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("no gradient for you")


def doubled(x):
    return _Fails.apply(x)


@gptlab.hookimpl
def gptlab_register(register):
    register("activation", "backward_bug", MLP.factory(doubled, "An activation with a broken backward."))
'''


def lab(tmp_path, monkeypatch, plugin_file: str, source: str, variants: dict) -> None:
    monkeypatch.chdir(tmp_path)
    write_lab(tmp_path, {"name": "probe", "plugins": [plugin_file], "model": {"preset": "nano", "n_layers": 3},
                         "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "log_every": 1, "eval_batches": 1},
                         "variants": variants, "seeds": [0]}, plugins={plugin_file: source})


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_attention_that_crashes_in_forward_is_named_before_anything_trains(tmp_path, monkeypatch, capsys,
                                                                              dry_run):
    lab(tmp_path, monkeypatch, "shape_bug_attention.py", SHAPE_BUG,
        {"fine": {}, "buggy": {"model": {"attention": "shape_bug"}}})
    before = tree_hash(tmp_path)
    rc, out, err = run_cli(capsys, "run", "exp.yaml", "--device", "cpu", *(["--dry-run"] if dry_run else []))
    line = one_line_error(rc, err)
    assert line.startswith("gptlab: error: exp.yaml: variant 'buggy': one training step of this model fails in "
                           "plugin 'shape_bug_attention' (attention 'shape_bug') (RuntimeError: ")
    assert tree_hash(tmp_path) == before  # no results folder, no token cache, no run
    assert not (tmp_path / "results").exists()


def test_a_backward_that_raises_is_named_too(tmp_path, monkeypatch, capsys):
    lab(tmp_path, monkeypatch, "backward_bug_mlp.py", BACKWARD_BUG, {"b": {"model": {"activation": "backward_bug"}}})
    rc, out, err = run_cli(capsys, "run", "exp.yaml", "--device", "cpu", "--dry-run")
    line = one_line_error(rc, err)
    assert "variant 'b'" in line and "plugin 'backward_bug_mlp' (activation 'backward_bug')" in line
    assert "(ValueError: no gradient for you)" in line


def _spec(**model) -> RunSpec:
    return RunSpec("v", 0, ModelConfig.from_any({"vocab_size": 64, "context_length": 64, "emb_dim": 32, "n_heads": 4,
                                                 "n_layers": 6, "drop_rate": 0.1, **model}),
                   DataConfig(), TrainConfig())


def test_the_probe_builds_at_most_two_layers_and_leaves_the_random_streams_alone(monkeypatch, builtin_system):
    built = []
    real = preflight.GPTModel

    def recording(cfg, plugins=None):
        built.append((cfg.n_layers, cfg.context_length))
        return real(cfg, plugins=plugins)

    monkeypatch.setattr(preflight, "GPTModel", recording)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    preflight.check_forward(_spec(), builtin_system)
    assert built == [(preflight.PROBE_LAYERS, 64)] * 2  # its size counted on the meta device, then run
    assert torch.equal(torch.get_rng_state(), state)


def test_every_builtin_combination_passes_the_probe(builtin_system):
    """The probe never refuses a model gptlab itself ships (one of each component kind at once)."""
    from helpers import ACTIVATIONS, ATTENTIONS, NORMS, PLACEMENTS, POSITIONS

    for i, position in enumerate(POSITIONS):
        preflight.check_forward(_spec(position=position, attention=ATTENTIONS[i % 2],
                                      norm=NORMS[i % 2], norm_placement=PLACEMENTS[i % 4],
                                      activation=ACTIVATIONS[i]), builtin_system)
    for activation in ACTIVATIONS:
        preflight.check_forward(_spec(activation=activation), builtin_system)


def test_the_error_names_the_plugin_not_gptlab_when_the_crash_is_deep_in_torch(tmp_path):
    """The innermost plugin frame is named even though the exception is raised inside torch."""
    path = tmp_path / "deep_bug.py"
    path.write_text(textwrap.dedent(SHAPE_BUG).replace("shape_bug", "deep_bug"))
    system = build_plugin_system(plugin_dirs=[], extra=[str(path)])
    with pytest.raises(preflight.ForwardFailed, match=r"in plugin 'deep_bug' \(attention 'deep_bug'\)"):
        preflight.check_forward(_spec(attention="deep_bug"), system)


def test_a_probe_model_beyond_probe_bytes_is_not_run(tmp_path, monkeypatch):
    """A deliberate giant (--allow-large) is not allocated for the probe: above PROBE_BYTES the
    check returns without running the model, so even a broken plugin passes it."""
    path = tmp_path / "giant_bug.py"
    path.write_text(textwrap.dedent(SHAPE_BUG).replace("shape_bug", "giant_bug"))
    system = build_plugin_system(plugin_dirs=[], extra=[str(path)])
    spec = _spec(attention="giant_bug")
    with pytest.raises(preflight.ForwardFailed):
        preflight.check_forward(spec, system)
    monkeypatch.setattr(preflight, "PROBE_BYTES", 8 * 1000)  # below this tiny model's 2-layer weights
    assert preflight.check_forward(spec, system) is None
