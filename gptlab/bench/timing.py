"""The measurement rules every gptlab benchmark shares, so their numbers can be put side by side.

Also imported by the scripts in benchmarks/; see the package docstring for the method.
"""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ..errors import ConfigError
from . import DTYPES


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere: the rule train.precision=auto follows."""
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, dtype: str) -> Callable[[], Any]:
    """A factory of the context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def environment(device: torch.device, dtype: str) -> dict:
    """The facts about this machine a reader needs to interpret, or reproduce, a figure."""
    from .. import __version__
    from ..train.devices import device_name

    env = {"device": device_name(device), "device_type": device.type, "dtype": dtype,
           "torch": torch.__version__, "gptlab": __version__, "python": platform.python_version(),
           "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_threads": torch.get_num_threads(),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        env["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        env["load_avg"] = None
    return env


@contextmanager
def torch_threads(n: Optional[int]):
    """Run the block with ``n`` intra-op CPU threads (None: leave torch's choice), then restore.

    One thread gives steadier CPU timings on shared cores; restoring keeps a library caller's
    setting intact."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Seconds taken by each of ``n`` calls of ``fn``.

    On CUDA two events bracket each call and the host synchronises once, after the loop, so it
    never stalls the queue. Elsewhere each call sits between two synchronize + perf_counter.
    """
    from ..train.devices import synchronize

    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda.synchronize(device)
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


@contextmanager
def peak_memory(device: torch.device):
    """Yield a dict that, once the block ends, holds ``peak`` (max_memory_allocated during it) and
    ``base`` (memory_allocated as it began), in bytes. Both stay None off CUDA, where torch keeps
    no such counter."""
    out: dict = {"peak": None, "base": None}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out["base"] = torch.cuda.memory_allocated(device)
    yield out
    torch.cuda.synchronize(device)
    out["peak"] = torch.cuda.max_memory_allocated(device)


def median(values: list[float]) -> float:
    """The statistic every benchmark reports: robust to the odd slow call on a busy machine."""
    return statistics.median(values)


def milliseconds(times: list[float]) -> list[float]:
    """Per-call seconds as the rounded milliseconds a report lists, so readers can see the spread."""
    return [round(t * 1e3, 4) for t in times]


def short_error(exc: BaseException, limit: int = 160) -> str:
    """An exception as one line that fits in a table cell: its type and first line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory (a finding, reported apart from bugs)."""
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def quoted(words: Iterable[Any]) -> str:
    """Words as one shell command line a reader can paste."""
    return " ".join(shlex.quote(str(w)) for w in words)


def rerun_command(words: list, threads: Optional[int], plugins_dir: Iterable[Path]) -> str:
    """``words`` plus the options every ``gptlab bench`` benchmark takes, as a pasteable command."""
    extra: list = ["--threads", threads] if threads else []
    for d in plugins_dir:
        extra += ["--plugins-dir", d]
    return quoted(list(words) + extra)
