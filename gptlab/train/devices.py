"""Device choice and the peak dense bf16 FLOP/s used for MFU."""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..errors import ConfigError

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
PEAK_BF16_FLOPS = {
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 (no bf16 on Volta)
}


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available.

    A CUDA device always comes back with its index ('cuda' and 'auto' mean the current device),
    so code downstream can pass it to set_device, DDP's device_ids and the RNG tables as it is.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda":
        if dev.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a known GPU, else None (MFU is then reported as n/a)."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> Optional[float]:
    """The table's peak for a device name: the longest key found in it as whole words ("L4" is
    not an "L40", "H200" not an "H200 NVL")."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # most specific first
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return PEAK_BF16_FLOPS[key]
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a scheduler or taskset may limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def cpu_threads(requested: Optional[int], jobs: int = 1) -> int:
    """CPU threads per run: as asked (``--threads``, else OMP_NUM_THREADS when set), else this
    process's cores shared among the runs in flight."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() // max(1, jobs))


def resolve_jobs(value: str, device: torch.device) -> int:
    """``--jobs``: a positive integer, or auto (one run per visible GPU; 1 on CPU)."""
    if str(value) == "auto":
        return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"--jobs must be a positive integer or auto, got {value!r}")
    return jobs
