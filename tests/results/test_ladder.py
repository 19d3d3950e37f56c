"""Scaling ladders (``scale:``): the power-law fit, compute multipliers with bootstrap intervals
recovered from synthetic runs drawn from a known law, the loader's checks and budget rule, and a
tiny ladder run end to end (one table per size, the fit under the last, the figure)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import gptlab
from gptlab import GPTModel
from gptlab.results.ladder import PowerLaw, describe, fit_power_law, ladder
from gptlab.run.experiment import load_experiment

from helpers import one_line_error, run_cli, write_lab

E, A, ALPHA = 1.6, 2.0e4, 0.32


def law(compute):
    return E + A * np.asarray(compute, float) ** -ALPHA


def test_the_fit_recovers_a_noiseless_power_law():
    compute = [1e9, 4e9, 1.6e10, 6.4e10]
    fit = fit_power_law(compute, law(compute))
    assert fit.E == pytest.approx(E, rel=1e-4) and fit.alpha == pytest.approx(ALPHA, rel=1e-4)
    assert fit.A == pytest.approx(A, rel=1e-3)
    assert fit.compute_for(fit.loss(3e10)) == pytest.approx(3e10, rel=1e-9)
    assert fit.compute_for(E - 0.1) == math.inf  # below the floor no compute reaches it


def test_a_fit_needs_three_points_at_two_computes():
    with pytest.raises(ValueError):
        fit_power_law([1e9, 2e9], [3.0, 2.9])
    with pytest.raises(ValueError):
        fit_power_law([1e9, 1e9, 1e9], [3.0, 2.9, 2.8])


def synthetic(multiplier: float, seeds: int, noise: float, rng) -> tuple[pd.DataFrame, dict]:
    """Runs of a baseline and a variant that behaves as the baseline given ``multiplier`` times its
    compute, at 3 sizes, each seed's loss off the law by N(0, noise)."""
    rows, runs = [], {}
    for variant, m in (("base", 1.0), ("better", multiplier)):
        for i, flops in enumerate((2e9, 8e9, 3.2e10)):
            h = f"{variant}{i}"
            runs[h] = (variant, f"s{i}")
            for seed in range(seeds):
                loss = float(law(flops * m)) + rng.normal(0.0, noise)
                rows.append({"config_hash": h, "status": "completed", "final_val_loss": loss,
                             "flops_per_token": flops / 1e6, "tokens": 1e6, "seed": seed})
    return pd.DataFrame(rows), runs


def test_the_multiplier_and_exponent_of_a_known_law_lie_in_their_intervals():
    df, runs = synthetic(multiplier=2.5, seeds=5, noise=0.004, rng=np.random.default_rng(7))
    base, better = ladder(df, runs, "base")
    assert [base.variant, better.variant] == ["base", "better"] and better.sizes == ["s0", "s1", "s2"]
    for lad in (base, better):
        lo, hi = lad.alpha_ci
        assert lo < ALPHA < hi and hi - lo < 0.1, lad.alpha_ci
    for m, (lo, hi) in zip(better.multiplier, better.multiplier_ci):
        assert lo < 2.5 < hi and abs(m - 2.5) < 0.4, (m, lo, hi)
    lo, hi = better.fitted_ci
    assert lo < 2.5 < hi and better.fitted == pytest.approx(2.5, rel=0.15)
    assert base.multiplier == pytest.approx([1.0, 1.0, 1.0], abs=0.05)  # the baseline against its own fit
    lines = describe([base, better], "base", "val_loss")
    assert lines[1].startswith("  base (baseline): E ") and "better: E " in lines[2]
    assert f"from the fits at {3.2e10:.3g} FLOPs: {better.fitted:.2f}x [{lo:.2f}x, {hi:.2f}x]" in lines[2]


def test_a_worse_variant_has_a_multiplier_below_one():
    df, runs = synthetic(multiplier=0.5, seeds=4, noise=0.003, rng=np.random.default_rng(3))
    _, worse = ladder(df, runs, "base")
    assert all(hi < 1.0 for _, hi in worse.multiplier_ci) and 0.4 < worse.fitted < 0.6


def test_one_seed_per_size_gives_no_interval_and_unfinished_runs_are_left_out():
    df, runs = synthetic(multiplier=2.0, seeds=1, noise=0.0, rng=np.random.default_rng(0))
    df = pd.concat([df, pd.DataFrame([{"config_hash": "better0", "status": "diverged", "final_val_loss": 99.0,
                                       "flops_per_token": 2e3, "tokens": 1e6, "seed": 1}])], ignore_index=True)
    _, better = ladder(df, runs, "base")
    assert better.n == [1, 1, 1]  # the diverged run is not a point
    assert better.multiplier == pytest.approx([2.0, 2.0, 2.0], rel=1e-3)
    assert all(math.isnan(lo) for lo, _ in better.multiplier_ci)
    assert "[no interval: needs 2+ seeds per size]" in describe([better], "base", "val_loss")[1]


# -- the loader -------------------------------------------------------------------------------------
LADDER = {
    "name": "lad",
    "model": {"preset": "nano", "context_length": 16},
    "train": {"batch_size": 2, "eval_every": 50, "eval_batches": 1, "log_every": 5, "lr": 3.0e-3},
    "variants": {"gelu": {}, "relu": {"model": {"activation": "relu"}}},
    "scale": {"sizes": [{"emb_dim": 16, "n_layers": 1, "n_heads": 2}, {"emb_dim": 32, "n_layers": 1, "n_heads": 2},
                        {"name": "big", "emb_dim": 32, "n_layers": 2, "n_heads": 2}],
              "tokens": [320, 480, 640]},
    "seeds": [0, 1],
}


@pytest.mark.parametrize("scale, words", [
    ({"sizes": ["nano", "micro"]}, ["scale.sizes lists 2 size(s)", "at least 3", "three parameters"]),
    ({"sizes": ["nano", "micro", "mini"], "token_per_param": 5}, ["unknown key 'token_per_param'", "tokens_per_param"]),
    ({"sizes": ["nano", "micro", "mimi"]}, ["unknown preset 'mimi'", "did you mean 'mini'"]),
    ({"sizes": ["nano", "micro", "mini"], "tokens": [1, 2]}, ["one positive token budget per size (3)"]),
    ({"sizes": ["nano", "micro", "mini"], "tokens": [1, 2, 3], "tokens_per_param": 5}, ["not both"]),
    ({"sizes": ["nano", "micro", "mini"], "baseline": "gleu"}, ["scale.baseline 'gleu' is not a variant",
                                                                 "did you mean 'gelu'"]),
    ({"sizes": [{"n_layers": 1}, {"n_layers": 1, "name": "again"}, {"n_layers": 2}]},
     ["scale sizes 'l1' and 'again' give gelu the same"]),
    ({"sizes": [{"emb_dim": 16}, {"emb_dim": 32}, {"emb_dim": 33}]}, ["scale size 'd33'", "n_heads"]),
])
def test_bad_scale_blocks_are_refused_when_loaded(capsys, tmp_path, scale, words):
    path = write_lab(tmp_path, {**LADDER, "scale": scale})
    rc, out, err = run_cli(capsys, "run", path, "--dry-run", "--results-dir", tmp_path / "results")
    one_line_error(rc, err, str(path), *words)
    assert not (tmp_path / "results").exists()


def test_scale_is_refused_beside_a_grid_or_a_tune_block(capsys, tmp_path):
    for extra, words in (({"grid": {"train.lr": [1e-3, 2e-3]}}, ["scale: and grid: cannot be combined"]),
                         ({"tune": {"key": "train.lr", "values": [1e-3, 2e-3]}}, ["scale: and tune: cannot be combined"])):
        path = write_lab(tmp_path, {**LADDER, **extra})
        one_line_error(*run_cli(capsys, "run", path, "--dry-run")[::2], *words)


def test_each_size_trains_for_its_budget_from_the_baselines_parameters(tmp_path):
    exp = load_experiment(write_lab(tmp_path, {**LADDER, "scale": {**LADDER["scale"], "tokens": None,
                                                                    "tokens_per_param": 3}}))
    assert [s["name"] for s in exp.scale.resolved] == ["d16-l1-h2", "d32-l1-h2", "big"]
    labels = sorted({spec.variant for spec in exp.runs})
    assert labels == sorted(f"{v},size={s}" for v in ("gelu", "relu") for s in ("d16-l1-h2", "d32-l1-h2", "big"))
    for size in exp.scale.resolved:
        with torch.device("meta"):
            model = GPTModel({**gptlab.PRESETS["nano"], "context_length": 16, **size["model"]})
        assert size["parameters"] == model.num_parameters()
        assert size["steps"] == round(3 * model.num_parameters() / (2 * 16))
        specs = [spec for spec in exp.runs if spec.variant.endswith(f"size={size['name']}")]
        assert len(specs) == 4 and {spec.train.steps for spec in specs} == {size["steps"]}  # 2 variants x 2 seeds
        assert {spec.model.emb_dim for spec in specs} == {size["model"]["emb_dim"]}
    assert exp.ladder == {spec.config_hash: tuple(spec.variant.split(",size=")) for spec in exp.runs}


# -- end to end -------------------------------------------------------------------------------------
def test_a_tiny_ladder_runs_and_reports_its_multiplier(capsys, tmp_path):
    path = write_lab(tmp_path, LADDER)
    results = tmp_path / "results"
    rc, out, err = run_cli(capsys, "run", path, "--results-dir", results, "--device", "cpu", "--quiet")
    assert rc == 0, err
    meta = json.loads((results / "lad" / "experiment.json").read_text())
    assert meta["scale"]["baseline"] == "gelu" and [s["name"] for s in meta["scale"]["sizes"]] == \
        ["d16-l1-h2", "d32-l1-h2", "big"]
    assert [s["steps"] for s in meta["scale"]["sizes"]] == [10, 15, 20]  # tokens / (2 x 16)
    rc, out, err = run_cli(capsys, "compare", results / "lad", "--format", "md")
    assert rc == 0, err
    for size in ("d16-l1-h2", "d32-l1-h2", "big"):
        assert f"lad, size {size}" in out and f"gelu,size={size}" in out
    # the ladder's lines, with the multiplier the ladder module computes from the same runs
    from gptlab.results.frame import load_results

    df = load_results(results / "lad")
    runs = {h: tuple(w) for h, w in meta["scale"]["runs"].items()}
    _, relu = ladder(df, runs, "gelu")
    assert relu.variant == "relu" and relu.n == [2, 2, 2]
    assert f"from the fits at {relu.compute[-1]:.3g} FLOPs: {relu.fitted:.2f}x" in " ".join(out.split())
    png = tmp_path / "ladder.png"
    rc, out, err = run_cli(capsys, "show", results / "lad", "--png", png)
    assert rc == 0 and out.startswith(f"wrote {png}") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
