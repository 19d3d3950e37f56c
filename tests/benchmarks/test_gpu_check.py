"""benchmarks/gpu_check.py on a machine without a GPU: its CPU run must pass every check and say
that no GPU was found, so CI catches a broken GPU-path script before a GPU is lent.

The script runs once per module in a subprocess (about a minute on one thread; CUDA is hidden so
the run is CPU-sized wherever the suite runs); the tests read its exit status and its report.
"""
from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys

import pytest

from gptlab import ConfigError
from gptlab.config.model import ModelConfig
from gptlab.plugin.hookspecs import KINDS
from gptlab.plugin.manager import default_plugins

from helpers import ATTENTIONS, POSITIONS, REPO_ROOT, cli_env

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
CHECK_NAMES = ("logits", "bf16 training", "torch.compile", "SDPA kernel", "model throughput",
               "attention vanilla vs sdpa", "vs Hugging Face", "DDP torchrun")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """(exit status, report text, console output) of one CPU run, from an empty folder."""
    work = tmp_path_factory.mktemp("gpu_check")
    report = work / "report.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", "--report", str(report)], cwd=work,
                          env=cli_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=600)
    return proc.returncode, report.read_text() if report.exists() else "", proc.stdout + proc.stderr


def section(report: str, number: int) -> str:
    """The text of the report's section ``## N. ...`` up to the next section."""
    m = re.search(rf"^## {number}\. .*?(?=^## |\Z)", report, flags=re.M | re.S)
    return m.group(0) if m else ""


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables in ``text``, as lists of stripped cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-") and r[0] not in ("#", "attention", "target")]


def test_cpu_run_exits_zero(cpu_run):
    rc, _, output = cpu_run
    assert rc == 0, output[-3000:]


def test_report_says_no_gpu_was_found(cpu_run):
    _, report, _ = cpu_run
    assert "**No GPU was found**" in report.split("## Checks")[0]


def test_every_check_passes(cpu_run):
    _, report, output = cpu_run
    statuses = {row[1]: row[2] for row in table_rows(report.split("## Checks")[1].split("## Targets")[0])}
    assert statuses == {name: "PASS" for name in CHECK_NAMES}, output[-3000:]


def test_logits_differences_are_numbers_below_tolerance(cpu_run):
    _, report, _ = cpu_run
    rows = table_rows(section(report, 1))
    below = {(row[0], row[1]): float(row[2]) <= TOLERANCE for row in rows if row[2] != "skipped"}
    skipped = {(row[0], row[1]) for row in rows if row[2] == "skipped" and "incompatible" in row[4]}
    registry = default_plugins().registry  # the script covers every registered attention, new ones included
    assert set(ATTENTIONS) <= set(registry.names("attention"))

    def compatible(attention: str, position: str) -> bool:  # the position's seams are ones the attention applies
        provides = KINDS["position"].attr(registry.get("position", position).factory, "provides")
        accepts = KINDS["attention"].attr(registry.get("attention", attention).factory, "accepts")
        return not (set(provides) & {"rotation", "score_bias"}) - set(accepts)

    def builds_as_named(attention: str) -> bool:  # flex_document needs its separator: the script leaves it out
        try:
            registry.lookup("attention", attention, {}, ModelConfig())
            return True
        except ConfigError:
            return False

    pairs = set(itertools.product([a for a in registry.names("attention") if builds_as_named(a)], POSITIONS))
    assert below == {pair: True for pair in pairs if compatible(*pair)}
    assert skipped == {pair for pair in pairs if not compatible(*pair)}


@pytest.fixture
def script(monkeypatch):
    """benchmarks/gpu_check.py imported as a module."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gc)  # its dataclass looks itself up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts benchmarks/ on the path: undo that after
    spec.loader.exec_module(gc)
    return gc


def test_targets_read_gpu_figures(script):
    """The GPU-only branch of the targets, fed figures as an H100 run would produce them."""
    gc = script
    results = {name: gc.Result(name) for name in CHECK_NAMES}
    results["model throughput"].figures.update(mfu=0.47)
    results["attention vanilla vs sdpa"].figures["ratios"] = {1024: (1.8, 4.0), 2048: (2.6, 4.5)}
    results["vs Hugging Face"].figures.update(ratio=0.97, spread=0.01, meets=False)
    verdicts = [row[2] for row in gc.evaluate_targets(results, on_gpu=True, device_name="NVIDIA H100 80GB HBM3")]
    assert verdicts == ["met, aim met", "met", "not met", "not met"]
    results["model throughput"].figures.update(mfu=0.42)  # above the 40% floor, short of the 45% aim
    verdicts = [row[2] for row in gc.evaluate_targets(results, on_gpu=True, device_name="NVIDIA H200")]
    assert verdicts[0] == "met, aim not met"
    results["model throughput"].figures.update(mfu=0.39)
    verdicts = [row[2] for row in gc.evaluate_targets(results, on_gpu=True, device_name="NVIDIA A100-SXM4-80GB")]
    assert verdicts[0] == "not met, aim not met (stated for an H100/H200)"


def test_the_fused_kernels_check_4_accepts_are_kernels_gptlab_reports(script):
    """Check 4 passes a combination on an accepted kernel only, compared with the name
    gptlab.bench.attention.sdpa_kernel_used gives it: flash or cuDNN without a score bias,
    memory-efficient or cuDNN with one; never math, which stores the T x T matrix."""
    from gptlab.bench.attention import _SDPA_OPS

    reported = {label for _, label in _SDPA_OPS}
    assert script.FUSED_KERNELS == {False: ("flash", "cudnn"), True: ("memory-efficient", "cudnn")}
    assert {kernel for kernels in script.FUSED_KERNELS.values() for kernel in kernels} <= reported - {"math"}
