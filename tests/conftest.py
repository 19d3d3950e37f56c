"""Shared helpers for the gptlab test suite: tiny configs, weight randomisation, plugin files."""
from __future__ import annotations

import hashlib
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch

import gptlab
from gptlab import GPTModel

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every model here is tiny: intra-op threads buy nothing and, on a shared 2-core machine, thread
# oversubscription makes the 640-combination sweep ~20x slower. One thread keeps the suite fast.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and gptlab run, called in-process, keeps to one thread too

# Every built-in model component: the sweeps below cover each one (plugins/ must register them all).
ATTENTIONS = ("vanilla", "sdpa")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post", "sandwich", "parallel")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu", "reglu")

@pytest.fixture(autouse=True)
def _neutral_working_directory(tmp_path_factory, monkeypatch):
    """Run each test from an empty folder, so a user's own ./plugins in the checkout (the README
    tutorial puts one there) cannot change what the tests load. Tests that need the checkout as
    the working directory chdir there themselves."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``gptlab ARGV`` in this process (gptlab.cli.main): (exit status, stdout, stderr)."""
    from gptlab.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def write_plugin(directory: Path, filename: str, source: str) -> Path:
    """Write a plugin file (source is dedented) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(scope="session")
def builtin_system():
    """A plugin system holding only the built-in plugins (no entry points, no ./plugins)."""
    system = gptlab.PluginSystem()
    system.load_builtins()
    return system


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


# -- the fast lane ----------------------------------------------------------------------------------
#: the tests `pytest -m "not slow"` leaves out: subprocess runs that take several seconds each
#: (torchrun groups, killed and resumed runs, worker pools, the tutorial as a user types it). Each
#: module they exercise keeps quicker tests in the fast lane; the full suite (.ci/run) runs them all.
SLOW = {
    "test_distributed.py": None,  # every test starts a 2-process torchrun
    "test_resume.py": None,  # every test kills or interrupts a real `gptlab run` subprocess
    "test_parallel.py": {"test_two_at_once_equals_one_by_one_and_logs_plain_lines", "test_a_locked_run_is_left_to_its_owner",
                         "test_ctrl_c_stops_every_run_resumably"},
    "test_launch.py": {"test_a_task_signalled_before_its_time_limit_is_requeued_and_resumes_bit_for_bit"},
    "test_tutorial.py": {"test_the_tutorial_commands_run_as_written"},
    "test_gpu_check.py": {"test_cpu_run_exits_zero"},
    "test_tracking.py": {"test_sinks_work_in_jobs_workers"},
    "test_runner.py": {"test_ctrl_c_marks_the_run_interrupted_and_a_rerun_resumes"},
    "test_gpu_path.py": {"test_mfu_is_per_device_under_a_two_process_torchrun"},
    "test_packaging.py": {"test_wheel_carries_builtin_plugins_and_they_load"},
}


def pytest_collection_modifyitems(config, items):
    """Mark the SLOW tests; a name listed there that no longer exists is an error, so the list
    cannot silently shrink when a test is renamed."""
    modules = {}
    for item in items:
        file, name = Path(str(item.fspath)).name, item.originalname
        modules[file] = item.module
        if file in SLOW and (SLOW[file] is None or name in SLOW[file]):
            item.add_marker(pytest.mark.slow)
    missing = [f"{file}::{name}" for file, module in modules.items() for name in (SLOW.get(file) or ())
               if not hasattr(module, name)]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(missing)}")
