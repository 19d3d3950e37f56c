"""The training recipe: optimizers, schedules and parameter groups as plugins.

Each optimizer is checked against a reference written here (Muon's Newton-Schulz and momentum,
Lion) or against torch's own (SGD, and AdamW for Muon's non-matrix parameters); the default
recipe against a hand-written pre-plugin AdamW + cosine loop, bit for bit; every schedule against
its formula; ``train.param_groups`` against the roles and globs it documents, down to the rates
logged in metrics.jsonl; bad input on the command line against one line and exit status 2.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gptlab import ComponentSpec, ConfigError, GPTModel, ModelConfig
from gptlab.config.model import parse_section
from gptlab.config.run import DataConfig, LATER_TRAIN_KEYS, RunSpec, TrainConfig, config_hash
from gptlab.data.tokens import Batches, TokenData
from gptlab.train.loop import train_run
from gptlab.train.recipe import make_optimizer, make_schedule, param_infos

from helpers import run_cli, tiny_cfg, write_lab

QUINTIC = (3.4445, -4.7750, 2.0315)


def train_cfg(**values) -> TrainConfig:
    """A TrainConfig parsed and checked as an experiment's train section is."""
    return parse_section(TrainConfig, values, "train")


class Toy(nn.Module):
    """An embedding, a wide and a tall hidden matrix with biases, a norm and an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.wide = nn.Linear(8, 4)  # weight 4 x 8: rows < cols
        self.tall = nn.Linear(3, 7)  # weight 7 x 3: rows > cols
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 10, bias=False)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy()
    with torch.no_grad():  # LayerNorm starts at exactly 1 and 0: give it values that decay can move
        model.norm.weight.add_(0.3 * torch.randn(6))
        model.norm.bias.add_(0.3 * torch.randn(6))
    return model


def grads_for(model: nn.Module, steps: int, seed: int = 1) -> list[dict]:
    """Fixed random gradients per step, by parameter name."""
    g = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()} for _ in range(steps)]


def step_with(optimizer: torch.optim.Optimizer, model: nn.Module, grads: dict) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -- 1. Muon ------------------------------------------------------------------------------------------
def ns_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration, written out: about U V^T of g."""
    a, b, c = QUINTIC
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_module(system):
    factory = system.registry.get("optimizer", "muon").factory
    return sys.modules[factory.__module__]


def test_orthogonalised_matrix_has_singular_values_near_one(builtin_system):
    orthogonalize = muon_module(builtin_system).orthogonalize
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 64), (64, 32), (16, 16)]:
        m = torch.randn(shape, generator=g)
        out = orthogonalize(m, 5)
        assert out.shape == m.shape and out.dtype == torch.float32
        sv = torch.linalg.svdvals(out)
        assert sv.min() > 0.5 and sv.max() < 1.5, (shape, sv)
        assert torch.allclose(out, ns_reference(m), atol=1e-6), shape
        # the input's singular values are spread far wider: the iteration is what brings them to ~1
        raw = torch.linalg.svdvals(m / torch.linalg.matrix_norm(m))
        assert raw.max() / raw.min() > 3
    # a tall matrix is orthogonalised through its transpose
    m = torch.randn(12, 5, generator=g)
    assert torch.allclose(orthogonalize(m, 5), orthogonalize(m.T.contiguous(), 5).T, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_a_hand_written_reference(builtin_system, nesterov):
    lr, wd, momentum, start, warmup, adamw_lr = 0.02, 0.1, 0.95, 0.85, 2, 3e-3
    t = train_cfg(lr=lr, weight_decay=wd, optimizer={"name": "muon", "momentum": momentum, "momentum_start": start,
                                                      "momentum_warmup": warmup, "nesterov": nesterov,
                                                      "adamw_lr": adamw_lr})
    model, ref = toy(), toy()
    optimizer = make_optimizer(model, t, builtin_system)
    kinds = {id(p): g["use_muon"] for g in optimizer.param_groups for p in g["params"]}
    assert [kinds[id(p)] for p in (model.wide.weight, model.tall.weight)] == [True, True]
    assert not any(kinds[id(p)] for p in (model.emb.weight, model.head.weight, model.wide.bias, model.norm.weight))

    # reference: Muon on the two hidden matrices, torch's AdamW on the rest
    matrices = {"wide.weight": ref.wide.weight, "tall.weight": ref.tall.weight}
    bufs = {name: torch.zeros_like(p) for name, p in matrices.items()}
    named = dict(ref.named_parameters())
    adamw = torch.optim.AdamW([{"params": [named["emb.weight"], named["head.weight"]], "weight_decay": wd},
                               {"params": [named[n] for n in ("wide.bias", "tall.bias", "norm.weight", "norm.bias")],
                                "weight_decay": 0.0}], lr=adamw_lr, betas=(t.beta1, t.beta2), eps=1e-8)
    steps = grads_for(model, 3)
    for grads in steps:  # gradients near eps on the norm: AdamW's eps must be the one torch uses
        grads["norm.weight"] *= 1e-8
        grads["norm.bias"] *= 1e-7
    for step, grads in enumerate(steps, start=1):
        step_with(optimizer, model, grads)
        with torch.no_grad():
            f = min(1.0, step / warmup)
            m = (1 - f) * start + f * momentum
            for name, p in matrices.items():
                g = grads[name]
                bufs[name].lerp_(g, 1 - m)
                update = ns_reference(g.lerp(bufs[name], m) if nesterov else bufs[name])
                scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * scale)
        for name, p in named.items():
            if name not in matrices:
                p.grad = grads[name].clone()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            assert torch.allclose(p, named[name], atol=1e-6, rtol=0), (step, name)
    # the weights moved by far more than the tolerance: the comparison has teeth
    start_weights = dict(toy().named_parameters())
    for name, p in model.named_parameters():
        assert (p - start_weights[name]).abs().max() > 1e-4, name
    # the tall matrix's step is larger by sqrt(rows/cols): scale was not left out
    assert (model.tall.weight.detach() != toy().tall.weight.detach()).all()


# -- 2. Lion and SGD ----------------------------------------------------------------------------------
def test_lion_matches_a_hand_written_reference(builtin_system):
    lr, wd, b1, b2 = 1e-3, 0.5, 0.8, 0.95
    t = train_cfg(lr=lr, weight_decay=wd, optimizer={"name": "lion", "betas": [b1, b2]})
    model, ref = toy(), toy()
    optimizer = make_optimizer(model, t, builtin_system)
    momenta = {name: torch.zeros_like(p) for name, p in ref.named_parameters()}
    for grads in grads_for(model, 3):
        step_with(optimizer, model, grads)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                g, m = grads[name], momenta[name]
                update = torch.sign(b1 * m + (1 - b1) * g)
                p.mul_(1 - lr * (wd if p.dim() >= 2 else 0.0))
                p.sub_(lr * update)
                momenta[name] = b2 * m + (1 - b2) * g
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    # three sign steps of +-lr: an undecayed element moved by exactly lr or 3 lr (up to rounding),
    # far beyond the tolerance; a decayed one moved too
    for (name, p), q in zip(model.named_parameters(), toy().parameters()):
        moved = (p - q).abs().detach()
        if p.dim() < 2:
            near = torch.minimum((moved - lr).abs(), (moved - 3 * lr).abs())
            assert near.max() < 1e-6, name
        assert moved.max() > 1e-3, name


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_sgd(builtin_system, nesterov):
    lr, wd, momentum = 0.05, 0.2, 0.8
    t = train_cfg(lr=lr, weight_decay=wd, optimizer={"name": "sgd", "momentum": momentum, "nesterov": nesterov})
    model, ref = toy(), toy()
    optimizer = make_optimizer(model, t, builtin_system)
    reference = torch.optim.SGD([{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": wd},
                                 {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                lr=lr, momentum=momentum, nesterov=nesterov)
    for grads in grads_for(model, 3):
        step_with(optimizer, model, grads)
        step_with(reference, ref, grads)
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), toy().parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, p0), name


# -- 3. the default recipe is the pre-plugin one, bit for bit -------------------------------------------
def cosine_reference(t: TrainConfig, step: int) -> float:
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    min_lr = t.lr / 10 if t.min_lr is None else t.min_lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return min_lr + 0.5 * (t.lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("train", [
    dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, grad_accum=1),
    dict(steps=6, batch_size=4, lr=5e-3, min_lr=2e-4, warmup_steps=0, grad_accum=2, grad_clip=0.05,
         weight_decay=0.3, beta1=0.8, beta2=0.99),
])
def test_default_recipe_is_bit_for_bit_the_pre_plugin_adamw_cosine(train):
    t = train_cfg(**train, log_every=1, eval_every=train["steps"], eval_batches=1)
    cfg = ModelConfig.from_any(tiny_cfg())
    spec = RunSpec("a", 3, cfg, DataConfig(), t)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 3000).astype(np.uint16)
    data = TokenData(train=tokens[:2700], val=tokens[2700:], tokenizer=None)
    cpu = torch.device("cpu")

    torch.manual_seed(0)
    model = GPTModel(cfg)
    torch.manual_seed(0)
    ref = GPTModel(cfg)
    rows: list = []
    train_run(spec, data, model, cpu, rows.append, lambda row: None)

    # the loop gptlab ran before optimizers and schedules were plugins, written out
    ref.train()
    params = list(ref.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.beta1, t.beta2))
    batches = Batches(data.train, t.batch_size, cfg.context_length, spec.seed, cpu)
    losses, clipped = [], 0
    for step in range(1, t.steps + 1):
        lr = cosine_reference(t, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = None
        for _ in range(t.grad_accum):
            x, y = batches.next()
            loss = ref(x, targets=y)
            (loss / t.grad_accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if t.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            clipped += bool(norm > t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((total / t.grad_accum).item())

    assert [r["step"] for r in rows] == list(range(1, t.steps + 1))
    assert [r["train_loss"] for r in rows] == losses
    assert [r["lr"] for r in rows] == [cosine_reference(t, s) for s in range(1, t.steps + 1)]
    assert not any(k.startswith("lr/") for r in rows for k in r), rows[0]  # one rate: no per-group columns
    if "grad_clip" in train:
        assert clipped == t.steps  # the clipping path was exercised at every step
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert losses[-1] < losses[0]


# -- 4. schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr, min_lr, warmup", [(1e-3, None, 0), (3e-3, 1e-4, 5), (0.02, 0.0, 3), (6e-4, 6e-5, 1)])
def test_cosine_is_the_formula_exactly(builtin_system, lr, min_lr, warmup):
    t = train_cfg(steps=20, lr=lr, min_lr=min_lr, warmup_steps=warmup)
    schedule = make_schedule(t, builtin_system)
    for step in range(1, 21):
        assert schedule.lr(step, t.lr) == cosine_reference(t, step), step
        assert schedule.lr(step, t.lr, "embeddings") == cosine_reference(t, step), step
    assert schedule.lr(20, lr) == pytest.approx(lr / 10 if min_lr is None else min_lr, rel=1e-12, abs=1e-15)
    # the multiplier is the rate at peak 1, and a group with twice the peak gets twice the rate
    for step in (1, warmup + 1, 12, 20):
        assert schedule.multiplier(step) == pytest.approx(cosine_reference(t, step) / lr, rel=1e-12)
        assert schedule.lr(step, 2 * lr, "g") == pytest.approx(2 * cosine_reference(t, step), rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
@pytest.mark.parametrize("min_lr", [None, 1e-4])
def test_wsd_warms_up_holds_and_decays(builtin_system, shape, min_lr):
    lr = 1e-3
    t = train_cfg(steps=20, lr=lr, min_lr=min_lr, warmup_steps=4,
                  schedule={"name": "wsd", "decay_fraction": 0.25, "shape": shape})
    schedule = make_schedule(t, builtin_system)
    low = 0.0 if min_lr is None else min_lr / lr
    expected = {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    expected.update({s: 1.0 for s in range(5, 16)})  # stable to step 15: the last 5 steps decay
    for s in range(16, 21):
        x = (s - 15) / 5
        expected[s] = low + (1 - low) * ((1 - x) if shape == "linear" else (1 - math.sqrt(x)))
    for step, want in expected.items():
        assert schedule.multiplier(step) == pytest.approx(want, rel=1e-12, abs=1e-15), step
        assert schedule.multiplier(step, "embeddings") == schedule.multiplier(step), step
        assert schedule.lr(step, 2 * lr, "head") == pytest.approx(2 * lr * want, rel=1e-12, abs=1e-18), step
    assert schedule.multiplier(20) == pytest.approx(low, abs=1e-15)
    if min_lr is None:
        assert schedule.multiplier(20) == 0.0
    assert schedule.lr(20, lr) == pytest.approx(0.0 if min_lr is None else min_lr, abs=1e-15)
    assert schedule.multiplier(16) < 1.0 and schedule.multiplier(17) < schedule.multiplier(16)
    if shape == "1-sqrt":  # 1-sqrt falls faster at first than the straight line
        assert schedule.multiplier(16) < 0.8 * (1 - low) + low


def test_wsd_warmup_into_the_decay_is_refused(builtin_system):
    ok = train_cfg(steps=20, warmup_steps=16, schedule={"name": "wsd", "decay_fraction": 0.2})
    assert make_schedule(ok, builtin_system).multiplier(16) == 1.0
    bad = train_cfg(steps=20, warmup_steps=17, schedule={"name": "wsd", "decay_fraction": 0.2})
    with pytest.raises(ConfigError) as err:
        make_schedule(bad, builtin_system)
    assert "train.schedule" in str(err.value) and "warmup_steps" in str(err.value)


@pytest.mark.parametrize("min_lr", [None, 2e-4])
def test_linear_and_constant_schedules(builtin_system, min_lr):
    lr = 1e-3
    linear = make_schedule(train_cfg(steps=10, lr=lr, min_lr=min_lr, warmup_steps=2, schedule="linear"),
                           builtin_system)
    constant = make_schedule(train_cfg(steps=10, lr=lr, min_lr=min_lr, warmup_steps=2, schedule="constant"),
                             builtin_system)
    low = 0.0 if min_lr is None else min_lr / lr
    for step in range(1, 11):
        warm = step / 2 if step <= 2 else None
        want = warm if warm is not None else 1 - (1 - low) * (step - 2) / 8
        assert linear.multiplier(step) == pytest.approx(want, rel=1e-12, abs=1e-15), step
        assert linear.multiplier(step, "scalars") == linear.multiplier(step)
        assert constant.multiplier(step) == (warm if warm is not None else 1.0), step
        assert constant.multiplier(step, "scalars") == constant.multiplier(step)
        assert constant.lr(step, 3 * lr, "x") == pytest.approx(3 * lr * constant.multiplier(step), rel=1e-12)
    assert linear.lr(10, lr) == pytest.approx(0.0 if min_lr is None else min_lr, abs=1e-15)


# -- 5. param_groups ----------------------------------------------------------------------------------
def roles(model: nn.Module, **train) -> dict:
    return {i.name: i.role for i in param_infos(model, train_cfg(**train))}


def test_roles_of_an_untied_and_a_tied_model():
    untied = GPTModel(tiny_cfg(tie_embeddings=False))
    got = roles(untied)
    assert {n for n, r in got.items() if r == "embeddings"} == {"tok_emb.weight", "position.emb.weight"}
    assert {n for n, r in got.items() if r == "head"} == {"head.weight"}
    names = dict(untied.named_parameters())
    assert {n for n, r in got.items() if r == "matrices"} == \
        {n for n, p in names.items() if p.dim() >= 2} - {"tok_emb.weight", "position.emb.weight", "head.weight"}
    assert {n for n, r in got.items() if r == "scalars"} == {n for n, p in names.items() if p.dim() < 2}
    assert "blocks.0.attn.qkv.weight" in got and got["blocks.0.attn.qkv.weight"] == "matrices"
    assert got["final_norm.weight"] == "scalars" and got["blocks.1.mlp.fc.bias"] == "scalars"

    tied = GPTModel(tiny_cfg(tie_embeddings=True))
    got = roles(tied)
    assert set(got.values()) == {"embeddings", "matrices", "scalars"}
    assert got["tok_emb.weight"] == "embeddings" and "head.weight" not in got
    assert len(got) == len(list(tied.parameters()))  # the tied tensor once
    with pytest.raises(ConfigError) as err:
        roles(tied, param_groups={"head": {"lr_mult": 2.0}})
    assert "tie_embeddings" in str(err.value) and "train.param_groups.head" in str(err.value)
    assert roles(untied, param_groups={"head": {"lr_mult": 2.0}})["head.weight"] == "head"


def test_a_glob_overrides_the_role_for_the_keys_it_sets():
    model = GPTModel(tiny_cfg())
    infos = {i.name: i for i in param_infos(model, train_cfg(weight_decay=0.1, param_groups={
        "matrices": {"lr_mult": 2.0, "weight_decay": 0.3}, "blocks.0.*": {"weight_decay": 0.0}}))}
    q0, q1 = infos["blocks.0.attn.qkv.weight"], infos["blocks.1.attn.qkv.weight"]
    assert (q0.lr_mult, q0.weight_decay, q0.group) == (2.0, 0.0, "blocks.0.*")
    assert (q1.lr_mult, q1.weight_decay, q1.group) == (2.0, 0.3, "matrices")
    n0, n1 = infos["blocks.0.norm1.weight"], infos["blocks.1.norm1.weight"]
    assert (n0.lr_mult, n0.weight_decay, n0.group) == (1.0, 0.0, "blocks.0.*")
    assert (n1.lr_mult, n1.weight_decay, n1.group) == (1.0, 0.0, "no_decay")
    emb = infos["tok_emb.weight"]
    assert (emb.lr_mult, emb.weight_decay, emb.group) == (1.0, 0.1, "decay")
    # two globs agreeing on a value are fine; disagreeing on one key of one parameter is an error
    same = param_infos(model, train_cfg(param_groups={"blocks.0.*": {"lr_mult": 2.0},
                                                      "blocks.0.attn.*": {"lr_mult": 2.0, "weight_decay": 0.5}}))
    qkv = {i.name: i for i in same}["blocks.0.attn.qkv.weight"]
    assert (qkv.lr_mult, qkv.weight_decay) == (2.0, 0.5)
    with pytest.raises(ConfigError) as err:
        param_infos(model, train_cfg(param_groups={"blocks.0.*": {"lr_mult": 2.0},
                                                   "blocks.0.attn.*": {"lr_mult": 3.0}}))
    assert "lr_mult" in str(err.value) and "blocks.0.attn" in str(err.value)


@pytest.mark.parametrize("rule", ["blocks.9.*", "head"])
def test_a_rule_that_matches_nothing_is_an_error(rule):
    with pytest.raises(ConfigError) as err:
        param_infos(GPTModel(tiny_cfg()), train_cfg(param_groups={rule: {"lr_mult": 2.0}}))
    assert f"train.param_groups.{rule}" in str(err.value) and "matches no parameter" in str(err.value)


def test_lr_mult_scales_the_group_peak_rate(builtin_system):
    t = train_cfg(lr=2e-3, param_groups={"embeddings": {"lr_mult": 0.5}, "scalars": {"lr_mult": 4.0},
                                         "blocks.1.*": {"lr_mult": 3.0, "weight_decay": 0.0}})
    model = GPTModel(tiny_cfg())
    optimizer = make_optimizer(model, t, builtin_system)
    peaks = {g["name"]: (g["peak_lr"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert peaks == {"embeddings": (1e-3, 1e-3, 0.1), "scalars": (8e-3, 8e-3, 0.0),
                     "blocks.1.*": (pytest.approx(6e-3, rel=1e-12),) * 2 + (0.0,), "decay": (2e-3, 2e-3, 0.1)}
    where = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    assert where[id(model.tok_emb.weight)] == "embeddings" and where[id(model.blocks[0].norm1.weight)] == "scalars"
    assert where[id(model.blocks[1].norm1.weight)] == "blocks.1.*"
    assert where[id(model.blocks[0].attn.qkv.weight)] == "decay"
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("groups, words", [
    ({"embeddings": {"lr_mult": 0}}, ["train.param_groups.embeddings.lr_mult", "> 0"]),
    ({"embeddings": {"weight_decay": -0.1}}, ["train.param_groups.embeddings.weight_decay", ">= 0"]),
    ({"embeddings": {"lr_mul": 2.0}}, ["lr_mul", "did you mean 'lr_mult'"]),
    ({"blocks.*": {}}, ["train.param_groups.blocks.*"]),
])
def test_bad_group_values_are_refused(groups, words):
    with pytest.raises(ConfigError) as err:
        train_cfg(param_groups=groups)
    assert all(w in str(err.value) for w in words), str(err.value)


# -- CLI runs -----------------------------------------------------------------------------------------
def experiment(path: Path, **train) -> Path:
    exp = {"name": "tiny", "model": {"preset": "nano", "n_layers": 2, "emb_dim": 32, "context_length": 16},
           "train": {"steps": 6, "batch_size": 2, "eval_every": 6, "log_every": 1, "eval_batches": 1,
                     "checkpoint_every": 0, **train},
           "variants": {"a": {}}, "seeds": [0]}
    return write_lab(path.parent, exp, path.name)


def run_dirs(root: Path) -> list:
    exp = root / "results" / "tiny"
    return [p for p in exp.iterdir() if p.is_dir()] if exp.exists() else []


def test_logged_group_rates_are_lr_times_schedule_times_lr_mult(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mults = {"embeddings": 0.5, "blocks.0.*": 2.0, "scalars": 3.0, "decay": 1.0}
    lr = 2e-3
    experiment(tmp_path / "tiny.yaml", lr=lr, warmup_steps=2, param_groups={
        "embeddings": {"lr_mult": 0.5}, "blocks.0.*": {"lr_mult": 2.0, "weight_decay": 0.0},
        "scalars": {"lr_mult": 3.0}})
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu")
    assert rc == 0, err
    (run,) = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    t = train_cfg(steps=6, lr=lr, warmup_steps=2)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        multiplier = cosine_reference(t, row["step"]) / lr
        assert {k for k in row if k.startswith("lr/")} == {f"lr/{name}" for name in mults}, row
        for name, mult in mults.items():
            assert math.isclose(row[f"lr/{name}"], lr * multiplier * mult, rel_tol=1e-12), (row["step"], name)
        assert row["lr"] == cosine_reference(t, row["step"])
    assert rows[0]["lr/blocks.0.*"] == pytest.approx(2e-3 * 0.5 * 2.0, rel=1e-12)  # warmup step 1 of 2


# -- 6. bad recipes on the command line -----------------------------------------------------------------
@pytest.mark.parametrize("train, words", [
    ({"optimizer": "muom"}, ["train.optimizer", "muom", "did you mean 'muon'"]),
    ({"optimizer": {"name": "muon", "ns_steps": 0}}, ["train.optimizer", "ns_steps"]),
    ({"optimizer": {"name": "lion", "betas": [0.9]}}, ["train.optimizer", "betas"]),
    ({"schedule": {"name": "wsd", "shape": "cubic"}}, ["train.schedule", "shape", "cubic"]),
    ({"param_groups": {"blocks.7.*": {"lr_mult": 2.0}}}, ["train.param_groups.blocks.7.*", "matches no parameter"]),
    ({"param_groups": {"head": {"lr_mult": 2.0}}}, ["train.param_groups.head", "tie_embeddings"]),
])
def test_bad_recipe_is_one_line_exit_2_and_no_run_folder(tmp_path, monkeypatch, capsys, train, words):
    monkeypatch.chdir(tmp_path)
    experiment(tmp_path / "tiny.yaml", **train)
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: error:"), err
    assert all(w in lines[0] for w in words), lines[0]
    assert run_dirs(tmp_path) == []


# -- 7. config hash -----------------------------------------------------------------------------------
def test_default_recipe_keeps_the_pre_plugin_config_hash():
    spec = RunSpec("a", 0, ModelConfig.from_any(tiny_cfg()), DataConfig(), train_cfg(steps=10))
    resolved = spec.resolved()
    assert {k: resolved["train"][k] for k in LATER_TRAIN_KEYS} == {"optimizer": "adamw", "schedule": "cosine",
                                                                    "param_groups": {}}
    before = copy.deepcopy(resolved)
    for key in LATER_TRAIN_KEYS:
        del before["train"][key]
    assert spec.config_hash == config_hash(before)
    hashes = {spec.config_hash}
    for change in [{"optimizer": "muon"}, {"optimizer": {"name": "adamw", "eps": 1e-6}}, {"schedule": "wsd"},
                   {"schedule": {"name": "cosine"}}, {"param_groups": {"embeddings": {"lr_mult": 2.0}}}]:
        other = RunSpec("a", 0, spec.model, spec.data, train_cfg(steps=10, **change))
        if change == {"schedule": {"name": "cosine"}}:  # the default written as a mapping is the default
            assert other.config_hash == spec.config_hash
            continue
        assert other.config_hash not in hashes, change
        hashes.add(other.config_hash)


# -- 8. gptlab bench model --optimizer -------------------------------------------------------------------
BENCH = ["bench", "model", "nano", "n_layers=2", "emb_dim=32", "--steps", "1", "--warmup", "0", "--gen-tokens", "0",
         "--device", "cpu", "--batch", "2", "--seq-len", "16"]


def test_bench_model_takes_an_optimizer(capsys):
    rc, out, err = run_cli(capsys, *BENCH, "--json", "--optimizer", "muon")
    assert rc == 0, err
    result = json.loads(out)
    assert result["settings"]["optimizer"] == "muon"
    assert [row["status"] for row in result["train"]] == ["ok"]
    assert "--optimizer muon" in result["command"]
    rc, out, err = run_cli(capsys, *BENCH, "--json", "--optimizer", "{name: muon, ns_steps: 3}")
    assert rc == 0, err
    assert json.loads(out)["settings"]["optimizer"] == {"name": "muon", "ns_steps": 3}


def test_bench_model_refuses_an_unknown_optimizer(capsys):
    rc, out, err = run_cli(capsys, *BENCH, "--optimizer", "muom")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: error:"), err
    assert "muom" in lines[0] and "did you mean 'muon'" in lines[0]
    assert out == ""
