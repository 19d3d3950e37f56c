"""What the tests share, in one module: tiny model configs and weights, the causality / gradient /
KV-cache sweep of a model (``sweep``), the gptlab command run in
this process (``run_cli``) and in a subprocess (``run_subprocess``), experiment folders
(``write_lab``), run folders written by hand (``make_run``, ``make_experiment``) and a plugin that
holds a run at a step until the test has acted (``HOLD_PLUGIN``).

Tests import it by name (``from helpers import run_cli``): pytest puts tests/, the folder of the
top conftest.py, on sys.path. Fixtures (``builtin_system``, ``cli``) live in conftest.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import yaml

from gptlab import GPTModel
from gptlab.rundir import COMPLETED, CONFIG, EXPERIMENT, METRICS, SUMMARY

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- tiny models ------------------------------------------------------------------------------------
#: every built-in model component: the sweeps cover each one (plugins/ must register them all)
ATTENTIONS = ("vanilla", "sdpa")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post", "sandwich", "parallel")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu", "reglu")

TINY = dict(vocab_size=48, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def tiny_cfg(**overrides) -> dict:
    """A CPU-instant config (vocab 48, context 16, width 32, 4 heads, 2 layers, no dropout)."""
    cfg = dict(TINY)
    cfg.update(overrides)
    return cfg


def build(plugins=None, seed: int = 0, **overrides) -> GPTModel:
    """A tiny GPTModel built under a fixed seed."""
    torch.manual_seed(seed)
    return GPTModel(tiny_cfg(**overrides), plugins=plugins)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter O(1)-scale random values (matrices ~ 1/sqrt(fan_in), embeddings ~ 0.3,
    norm gains ~ 1 +- 0.2, biases ~ 0.2), so attention is sharp and a wrong position, mask or cache
    offset moves the logits far beyond float32 noise (the GPT-2 init keeps attention near uniform)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            scale = 0.3 if "emb" in name else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(noise * scale)
        elif name.endswith("weight"):  # norm gains
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.2 * noise)
    return model


def clone_into(src: GPTModel, dst: GPTModel) -> GPTModel:
    """Load src's weights into dst (strict: both must have the same parameter names and shapes)."""
    dst.load_state_dict(src.state_dict())
    return dst


# -- the causality / gradient / KV-cache sweep --------------------------------------------------------
def check_model(cfg, plugins, idx, targets, t, prefill, chunk) -> None:
    """The model of ``cfg``, randomised: gradients reach every parameter, row 1 of ``idx`` (which
    differs from row 0 only after position ``t``) leaves positions up to ``t`` alone, and decoding
    with the KV cache (``prefill`` tokens, then ``chunk``, then one at a time) equals the full forward."""
    model = GPTModel(cfg, plugins=plugins)
    randomize_(model, seed=1)
    model.train()  # dropout is 0, so train and eval compute the same function
    B, T = idx.shape

    logits = model(idx)
    assert logits.shape == (B, T, TINY["vocab_size"])
    assert torch.isfinite(logits).all(), "non-finite logits"
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    # causality: row 1 equals row 0 up to position t and differs after it
    torch.testing.assert_close(logits[1, : t + 1], logits[0, : t + 1], atol=1e-5, rtol=0,
                               msg=lambda m: f"future tokens changed past logits: {m}")
    assert (logits[1, t + 1:] - logits[0, t + 1:]).abs().max() > 1e-3, "later tokens had no effect"

    # KV cache: prefill, one chunk at a non-zero offset, then one token at a time
    model.eval()
    full = logits.detach()
    with torch.no_grad():
        cache = model.new_cache(T)
        steps = [model(idx[:, :prefill], cache=cache)]
        steps.append(model(idx[:, prefill:prefill + chunk], cache=cache))
        for i in range(prefill + chunk, T):
            steps.append(model(idx[:, i:i + 1], cache=cache))
        assert cache.offset == T
        incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0,
                               msg=lambda m: f"cached decoding differs from the full forward: {m}")


def count_checkpoints(monkeypatch) -> list:
    """Count the model's activation-checkpoint calls: returns the list each call appends to."""
    import gptlab.model.gpt as gptlab_model

    calls: list = []
    real = gptlab_model.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gptlab_model, "checkpoint", counting_checkpoint)
    return calls


def sweep(plugins, cases) -> list[str]:
    """``check_model`` for each (label, tiny config) of ``cases`` on 12 tokens (the second row differs
    after position 5; prefill 4, chunk 3): every failure, one line each, not just the first."""
    T, t, prefill, chunk, V = 12, 5, 4, 3, TINY["vocab_size"]
    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, V, (T,), generator=g)
    changed = row.clone()
    changed[t + 1:] = (row[t + 1:] + torch.randint(1, V, (T - t - 1,), generator=g)) % V  # every later token differs
    idx = torch.stack([row, changed])
    targets = torch.randint(0, V, (2, T), generator=g)
    failures = []
    for label, cfg in cases:
        try:
            check_model(cfg, plugins, idx, targets, t, prefill, chunk)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return failures


# -- files and folders ------------------------------------------------------------------------------
def write_plugin(directory: Path, filename: str, source: str) -> Path:
    """Write a plugin file (source is dedented) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(textwrap.dedent(source))
    return path


def write_lab(root: Path, experiment: dict, name: str = "exp.yaml", plugins: Optional[dict] = None) -> Path:
    """An experiment folder: ``experiment`` written as ``root/name`` (YAML, in the order given) and
    each of ``plugins`` (file name -> source, dedented) beside it. Returns the experiment file."""
    root.mkdir(parents=True, exist_ok=True)
    for filename, source in (plugins or {}).items():
        write_plugin(root, filename, source)
    path = root / name
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def pre_vs_post(**train) -> dict:
    """A tiny experiment 'tiny' (nano, one layer, context 32): variants a (pre-LN) and b (post-LN), seed 0."""
    return {"name": "tiny", "model": {"preset": "nano", "n_layers": 1, "context_length": 32}, "train": train,
            "variants": {"a": {}, "b": {"model": {"norm_placement": "post"}}}, "seeds": [0]}


def tree_hash(root: Path) -> str:
    """A hash of every entry under ``root``: names, file bytes, link targets (links never followed)."""
    digest = hashlib.sha256()
    if not os.path.lexists(root):
        return "absent"
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_symlink():
                digest.update(b"link:" + os.readlink(path).encode())
            elif path.is_file():
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: its bytes and mtime (ns)."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- the gptlab command -----------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``gptlab ARGV`` in this process (gptlab.cli.main): (exit status, stdout, stderr). ``capsys``
    None (a module fixture has none) captures the output with contextlib's redirects instead."""
    from gptlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if capsys is None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            rc = exc.code
    if capsys is not None:
        return (rc, *capsys.readouterr())
    return rc, out.getvalue(), err.getvalue()


def cli_env(**extra: Optional[str]) -> dict:
    """This process's environment for a gptlab subprocess: one thread, 200 columns, unbuffered
    output; ``extra`` on top (a value None removes the variable)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_subprocess(*argv, cwd: Optional[Path] = None, env: Optional[dict] = None, timeout: float = 600,
                   module: str = "gptlab", flags: tuple = (), torchrun: int = 0, wait: bool = True):
    """``python [FLAGS] -m gptlab ARGV`` in a subprocess (``torchrun`` > 0: under ``torchrun
    --standalone --nproc_per_node TORCHRUN``), with ``cli_env(**env)``. Waits at most ``timeout`` s
    and returns the CompletedProcess (text output); ``wait=False`` returns the Popen at once."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    cmd = [sys.executable, *flags, *launcher, "-m", module, *map(str, argv)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=cli_env(**(env or {})), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def imported_modules(stderr: str) -> list[str]:
    """The modules a ``-X importtime`` interpreter imported, read from its stderr."""
    return [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


def one_line_error(rc: int, err: str, *words: str) -> str:
    """Exit status 2 and exactly one line on stderr, the error, holding every word; returns it."""
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: error: "), err
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


# -- waiting for an event ---------------------------------------------------------------------------
def wait_for(condition: Callable[[], Any], timeout: float = 120.0, what: str = "the condition",
             proc: Optional[subprocess.Popen] = None, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something true, and return that. Fails after ``timeout``
    seconds, or at once when ``proc`` (a subprocess that should still be running) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


#: A plugin that holds a run inside a log step, so a test can act on it mid-run (signal, kill or
#: requeue it) at a step it chose, without slowing any run down. ``hold(folder, step)`` arms it (the
#: folder the plugin file is in); the first log step at or after ``step`` (of the variant named,
#: if any) touches ``held-<run folder>`` there and waits until the process receives SIGINT or
#: SIGTERM (passed on to the handler it replaced) or ``release(folder)``, once per run and process;
#: it changes no number.
HOLD_PLUGIN = '''
"""Holds a run at a log step until it is signalled or released (tests/helpers.py: hold, release)."""
import os
import signal
import time
from pathlib import Path

import gptlab

HERE = Path(__file__).parent
HELD = set()  # once per run and process


def _wait(run):
    HELD.add(run.dir.name)
    received, previous = [], {}

    def note(signum, frame):
        received.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # what the signal would have done: do it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, note)
        except ValueError:  # not the main thread
            pass
    (HERE / f"held-{run.dir.name}").touch()
    deadline = time.monotonic() + 120
    try:
        while not received and not (HERE / "released").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@gptlab.hookimpl
def gptlab_log(run, step, metrics):
    order = HERE / "hold_at"
    if not order.is_file() or (HERE / "released").exists():
        return
    at, *variant = order.read_text().split()
    if step >= int(at) and variant in ([], [run.name]) and run.dir.name not in HELD:
        _wait(run)
'''


def hold(folder: Path, step: int, variant: Optional[str] = None) -> None:
    """Arm HOLD_PLUGIN in ``folder``: hold the first log step at or after ``step`` (of ``variant``)."""
    (folder / "hold_at").write_text(f"{step} {variant or ''}".strip())


def held(folder: Path, proc: Optional[subprocess.Popen] = None, runs: int = 1, timeout: float = 300.0) -> list:
    """Wait until ``runs`` runs are held in ``folder`` (failing if ``proc`` exits first); their markers."""

    def markers():
        found = sorted(folder.glob("held-*"))
        return found if len(found) >= runs else None

    return wait_for(markers, timeout, f"{runs} run(s) held in {folder}", proc)


def release(folder: Path) -> None:
    """Let every held run in ``folder`` go on, and hold none from now on."""
    (folder / "released").touch()


# -- run folders written by hand ----------------------------------------------------------------------
# No training: each run gets a config.yaml, a summary.json and a short metrics.jsonl whose numbers the
# tests choose, so tables and statistics can be checked against hand-computed values in milliseconds.
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
