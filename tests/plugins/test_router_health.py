"""Diagnostics through the auxiliary channel (``gptlab.aux_metric``): averaged over the modules
that report them, never part of the loss; the MoE plugin reports its router health with them, and
tables show a MoE run's active parameters next to its total."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml

from gptlab import fmt
from gptlab.plugin.components import aux_loss, aux_metric, pop_aux_losses
from gptlab.train.loop import train_step


def test_diagnostics_are_averaged_over_modules_and_never_trained_on():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    holder = torch.nn.Sequential(a, b).train()
    aux_metric(a, "load", torch.tensor(1.0))
    aux_metric(b, "load", torch.tensor(3.0))
    aux_loss(a, "pull", torch.tensor(2.0), 0.5)
    out = pop_aux_losses(holder)
    assert out["load"][0].item() == 2.0 and out["load"][1] is None
    assert out["pull"][0].item() == 2.0 and out["pull"][1] == 0.5


def test_a_diagnostic_does_not_change_the_gradient():
    class Probe(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            aux_metric(self, "size", y.pow(2).mean())
            return y

    torch.manual_seed(0)
    model = Probe(3, 3)
    x = torch.randn(4, 3)
    plain = torch.nn.Linear(3, 3)
    plain.load_state_dict(model.state_dict())

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, targets=None):
            return (self.inner(x) - targets).pow(2).mean()

    for m in (model, plain):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        aux: dict = {}
        train_step(Wrap(m), opt, lambda: (x, torch.zeros(4, 3)), 1, torch.enable_grad, None, list(m.parameters()),
                   aux=aux)
        if m is model:
            assert set(aux) == {"size"}
    assert torch.equal(model.weight, plain.weight) and torch.equal(model.bias, plain.bias)


def test_a_moe_run_logs_router_health_and_tables_show_active_parameters(tmp_path):
    exp = {"name": "health", "model": {"preset": "nano", "n_layers": 2, "emb_dim": 32, "n_heads": 4,
                                       "activation": {"name": "moe", "n_experts": 4, "top_k": 1}},
           "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 1, "log_every": 3}, "seeds": [0]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "gptlab", "run", "exp.yaml", "--device", "cpu"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "health").glob("*__s0")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 1.0 <= r["aux/moe_max_load"] <= 4.0  # max / mean of 4 experts' loads
        assert r["aux/moe_dead_experts"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # k/4 per layer, averaged
    summary = json.loads((run_dir / "summary.json").read_text())
    per_expert = 2 * 32 * (4 * 32)  # w_in and w_out of one expert: width 4 x emb_dim / top_k
    assert summary["active_parameters"] == summary["parameters"] - 2 * 3 * per_expert  # 3 of 4 skipped, 2 layers
    table = subprocess.run([sys.executable, "-m", "gptlab", "compare", "results/health"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300).stdout
    expected = f"{fmt.si(summary['parameters'])} ({fmt.si(summary['active_parameters'])} active)"
    assert expected in table
