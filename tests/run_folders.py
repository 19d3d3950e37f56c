"""Run directories written by hand, as the runner leaves them, for tests that read results.

No training is involved: each run gets a config.yaml, a summary.json and a short metrics.jsonl
whose numbers the tests choose, so tables and statistics can be checked against hand-computed
values in milliseconds.
"""
from __future__ import annotations

import json
from pathlib import Path

from gptlab.rundir import CONFIG, COMPLETED, EXPERIMENT, METRICS, SUMMARY

BASE_MODEL = {"n_layers": 2, "emb_dim": 32, "position": "learned", "norm_placement": "pre", "activation": "gelu"}


def make_run(exp_dir: Path, variant: str, seed: int, val: float | None, *, status: str = COMPLETED,
             model: dict | None = None, summary: dict | None = None, metrics: list | None = None,
             chash: str | None = None) -> Path:
    """One run of ``variant`` whose final (and best) val loss is ``val``; ``model``, ``summary`` and
    ``metrics`` override or replace what it would otherwise write."""
    chash = chash or f"h{variant}"
    run = exp_dir / f"{variant}__{chash}__s{seed}"
    run.mkdir(parents=True)
    meta = {"experiment": exp_dir.name, "variant": variant, "seed": seed, "config_hash": chash}
    config = {**meta, "model": {**BASE_MODEL, **(model or {})}, "data": {"dataset": "python_docs"},
              "train": {"steps": 20, "eval_lengths": [1, 2]}}
    (run / CONFIG).write_text(json.dumps(config))  # JSON is YAML
    body = {**meta, "status": status, "final_val_loss": val, "best_val_loss": val, "best_val_step": 20,
            "final_train_loss": None if val is None else val + 0.1, "tokens_per_s": 1000.0 + seed,
            "parameters": 5000, "wall_time_s": 2.0, **(summary or {})}
    (run / SUMMARY).write_text(json.dumps(body))
    if metrics is None and val is not None:  # train loss at 5..20; val loss val + 0.5 at 10, val at 20
        metrics = [{"step": s, "train_loss": val + 2.0 / s, "lr": 1e-3} for s in (5, 10, 15, 20)]
        metrics[1]["val_loss"], metrics[3]["val_loss"] = val + 0.5, val
    (run / METRICS).write_text("".join(json.dumps(r) + "\n" for r in metrics or []))
    return run


def make_experiment(root: Path, name: str, arms: dict, compare: dict | None = None, defined: dict | None = None,
                    **kw) -> Path:
    """``root/name`` with experiment.json and, for each variant of ``arms`` (variant -> final val
    losses, one run per seed, in declaration order), its runs; ``kw[variant]`` goes to make_run.
    ``defined`` (config hash -> variant) is what the experiment's file defines; without it every
    run counts as defined, as for results written before gptlab recorded it."""
    exp = root / name
    exp.mkdir(parents=True)
    meta = {"name": name, "variants": list(arms), "compare": compare or {},
            "base": {"model": BASE_MODEL, "data": {"dataset": "python_docs"}, "train": {"steps": 20}}}
    if defined is not None:
        meta["defined"] = defined
    (exp / EXPERIMENT).write_text(json.dumps(meta))
    for variant, vals in arms.items():
        for seed, val in enumerate(vals):
            make_run(exp, variant, seed, val, **kw.get(variant, {}))
    return exp
