"""FlexAttention ('flex' and its score_mod / mask_mod variants): on the CPU each forward equals the
explicit attention it stands for to 1e-5, through the KV cache too; training there is refused before
anything trains, in one line; the attention benchmark reports it unsupported rather than failed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

import gptlab
from gptlab import ConfigError, GPTModel

BASE = {**gptlab.PRESETS["nano"], "n_layers": 2, "emb_dim": 32, "n_heads": 4, "drop_rate": 0.0,
        "context_length": 64}
SEP = 7


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        yield


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 256, (2, 40), generator=g)
    x[0, 10], x[0, 30], x[1, 25] = SEP, SEP, SEP  # documents: row 0 has three, row 1 two
    return x


def pair(flex: dict, reference: dict, flex_position: str = "rope", reference_position: str = "rope"):
    torch.manual_seed(0)
    a = GPTModel({**BASE, "position": flex_position, "attention": flex}).eval()
    torch.manual_seed(0)
    b = GPTModel({**BASE, "position": reference_position, "attention": reference}).eval()
    return a, b


@pytest.mark.parametrize("flex, reference, positions", [
    ({"name": "flex"}, {"name": "vanilla"}, ("rope", "rope")),
    ({"name": "flex", "n_kv_heads": 2, "qk_norm": "rmsnorm"}, {"name": "vanilla", "n_kv_heads": 2, "qk_norm": "rmsnorm"},
     ("learned", "learned")),
    ({"name": "flex_softcap", "cap": 3.0}, {"name": "vanilla", "softcap": 3.0}, ("rope", "rope")),
    ({"name": "flex", "softcap": 3.0}, {"name": "vanilla", "softcap": 3.0}, ("rope", "rope")),
    ({"name": "flex_window", "size": 5}, {"name": "vanilla", "window": 5}, ("rope", "rope")),
    ({"name": "flex", "window": 5}, {"name": "vanilla", "window": 5}, ("none", "none")),
    ({"name": "flex_alibi"}, {"name": "vanilla"}, ("none", "alibi")),
])
def test_each_flex_variant_equals_the_explicit_attention_it_stands_for(flex, reference, positions):
    a, b = pair(flex, reference, *positions)
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)
        cache = a.new_cache(40)
        parts = [a(x[:, :12], cache=cache)] + [a(x[:, t:t + 1], cache=cache) for t in range(12, 40)]
        assert torch.allclose(torch.cat(parts, 1), b(x), atol=1e-5)


def test_the_document_mask_equals_attention_within_each_document():
    """Reference: each document of each row run through the plain model on its own."""
    a, b = pair({"name": "flex_document", "separator": SEP}, {"name": "vanilla"}, "none", "none")
    x = tokens()
    with torch.no_grad():
        out = a(x)
        for row, cuts in ((0, [0, 11, 31, 40]), (1, [0, 26, 40])):  # a separator ends its document
            for start, end in zip(cuts, cuts[1:]):
                alone = b(x[row:row + 1, start:end])[0]
                assert torch.allclose(out[row, start:end], alone, atol=1e-5), (row, start)
        cache = a.new_cache(40)
        parts = [a(x[:, :12], cache=cache)] + [a(x[:, t:t + 1], cache=cache) for t in range(12, 40)]
        assert torch.allclose(torch.cat(parts, 1), out, atol=1e-5)


def test_generation_on_the_cpu_works_and_a_backward_does_not():
    torch.manual_seed(0)
    model = GPTModel({**BASE, "attention": "flex"})
    out = model.generate(tokens()[:, :5], 6, temperature=0)
    assert out.shape == (2, 11)
    model.train()
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        model(tokens(), targets=tokens()).backward()


def test_a_cpu_training_run_is_refused_before_anything_trains(tmp_path):
    exp = {"name": "flexrun", "model": {**{k: BASE[k] for k in ("n_layers", "emb_dim", "n_heads")}, "preset": "nano",
                                        "layers": [{"at": 1, "attention": {"name": "flex_window", "size": 8}}]},
           "train": {"steps": 4, "batch_size": 2}, "seeds": [0]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    for extra in ([], ["--dry-run"]):
        proc = subprocess.run([sys.executable, "-m", "gptlab", "run", "exp.yaml", "--device", "cpu", *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "gptlab: error: exp.yaml: variant 'base': attention 'flex_window' cannot train on cpu: torch has no "
            "backward for its kernel there (it evaluates and generates there); train it with --device cuda"]
        assert not list(tmp_path.glob("results/flexrun/*__s0"))  # no run folder was made


def test_the_attention_benchmark_reports_flex_unsupported_on_the_cpu(capsys):
    from gptlab.cli import main

    rc = main(["bench", "attention", "--attention", "sdpa,flex", "--seq-lens", "32", "--batch", "1", "--repeats", "1",
               "--warmup", "0", "--device", "cpu", "--json"])
    rows = {r["attention"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rc == 0 and rows["sdpa"]["status"] == "ok"
    assert rows["flex"]["status"] == "unsupported" and "trains on cuda only" in rows["flex"]["error"]


def test_flex_options_are_checked_like_every_attention():
    with pytest.raises(ConfigError, match="attention 'flex_window' option size must be an integer >= 1"):
        GPTModel({**BASE, "attention": {"name": "flex_window", "size": 0}})
    with pytest.raises(ConfigError, match="attention 'flex_document' has no option 'sep'"):
        GPTModel({**BASE, "attention": {"name": "flex_document", "sep": 0}})
