"""Time one attention module per registered implementation, and per forced SDPA kernel.

Implementations are built through the registry, so a plugin's attention is benchmarked like a
built-in one; which SDPA kernel really ran is read from the aten op torch dispatched, because
what was asked for and what ran differ more often than one would hope.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, did_you_mean, one_line
from ..plugin.hookspecs import KINDS
from . import FORCEABLE_KERNELS
from .timing import (autocast, environment, is_oom, median, milliseconds, peak_memory, quoted, rerun_command,
                     resolve_dtype, short_error, time_calls, torch_threads)

# aten ops behind F.scaled_dot_product_attention's kernels -> the reported name (most specific first).
_SDPA_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "memory-efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused (backend-specific)"),
    ("_scaled_dot_product_attention_math", "math"),
)


def bench_attention(*, attention: Optional[Sequence[str]] = None, position: Optional[str] = None,
                    seq_lens: Sequence[int] = (256, 512, 1024), batch: int = 8, heads: int = 12, head_dim: int = 64,
                    kernels: Optional[Sequence[str]] = None, repeats: int = 10, warmup: int = 3,
                    device: str = "auto", dtype: str = "auto", plugins_dir: Iterable[Path] = (),
                    threads: Optional[int] = None) -> dict:
    """Causal forward+backward of one attention module per (seq_len, implementation, kernel).

    ``attention`` defaults to every registered implementation, the model's default first (the
    first one is the baseline of the ratios); ``kernels`` to every forceable SDPA kernel on CUDA
    and 'default' elsewhere. Returns the report: env, settings, command, argv, baseline, rows,
    failed. A row that cannot run says so in its status instead of raising.
    """
    from ..config.model import ModelConfig
    from ..train.devices import resolve_device
    from ..plugin.manager import build_plugin_system

    plugins_dir = list(plugins_dir)
    seq_lens = list(seq_lens)
    with torch_threads(threads):
        dev = resolve_device(device)
        dtype = resolve_dtype(dtype, dev)
        plugins = build_plugin_system(plugin_dirs=plugins_dir)
        default_attention = ModelConfig().attention.name
        registered = sorted(plugins.registry.names("attention"), key=lambda n: n != default_attention)
        names = list(dict.fromkeys(attention or registered))
        position = position or ModelConfig().position.name
        kernels = _kernels_for(kernels, dev)
        C = heads * head_dim
        ctx_factory = autocast(dev, dtype)

        # resolve every pair before allocating anything, so a bad name fails at once; of the registered
        # ones (no --attention), those that need an option to be built (flex_document's separator)
        # or another position are left out and named
        built, left_out = {}, {}
        for name in names:
            try:
                built[name] = _resolve_pair(name, position, max(seq_lens), heads, C, plugins)
            except ConfigError as exc:
                if attention:
                    raise
                left_out[name] = one_line(exc, 200)
        names = [n for n in names if n in built]
        settings = {"attention": names, "left_out": left_out, "position": position, "seq_lens": seq_lens,
                    "batch": batch,
                    "heads": heads, "head_dim": head_dim, "emb_dim": C, "kernels": kernels,
                    "repeats": repeats, "warmup": warmup, "causal": True, "pass": "forward+backward"}
        rows = _time_rows(built, settings, ctx_factory, dev)
        add_ratios(rows, names[0])
        env = environment(dev, dtype)
    command = ["gptlab", "bench", "attention", "--attention", ",".join(names), "--position", position,
               "--seq-lens", ",".join(map(str, seq_lens)), "--batch", batch, "--heads", heads,
               "--head-dim", head_dim, "--kernels", ",".join(kernels), "--repeats", repeats,
               "--warmup", warmup, "--device", str(dev), "--dtype", dtype]
    return {"benchmark": "attention", "env": env, "settings": settings,
            "command": rerun_command(command, threads, plugins_dir), "argv": quoted(sys.argv),
            "baseline": names[0], "rows": rows, "failed": any(r["status"] == "failed" for r in rows)}


def _resolve_pair(name: str, position: str, context_length: int, heads: int, emb_dim: int, plugins) -> tuple:
    """A one-layer ModelConfig for attention ``name`` with ``position``, and its resolved components."""
    from ..config.model import ModelConfig
    from ..model.gpt import resolve_components

    cfg = ModelConfig.from_any({"vocab_size": 1, "context_length": context_length, "emb_dim": emb_dim,
                                "n_heads": heads, "n_layers": 1, "drop_rate": 0.0, "attention": name,
                                "position": position})
    return cfg, resolve_components(cfg, plugins)


def _time_rows(built: dict, settings: dict, ctx_factory, dev: torch.device) -> list[dict]:
    """Rows for every (seq_len, implementation, kernel) in ``settings``. Each module is built from
    seed 0, so every implementation starts from the same random state, and freed before the next."""
    batch, C, rows = settings["batch"], settings["emb_dim"], []
    for T in settings["seq_lens"]:
        for name in settings["attention"]:
            cfg, entries = built[name]
            torch.manual_seed(0)
            attn = entries["attention"].factory(cfg, **cfg.attention.options).to(dev).train()
            pos = entries["position"].factory(cfg, **cfg.position.options).to(dev)
            pctx = pos.context(0, T, dev, torch.float32)
            pctx.tokens = torch.zeros(batch, T, dtype=torch.long, device=dev)  # the one token of vocab_size 1
            x = torch.randn(batch, T, C, device=dev, requires_grad=True)
            base = {"attention": name, "seq_len": T, "batch": batch, "heads": settings["heads"],
                    "head_dim": settings["head_dim"]}
            rows.extend(_time_kernels(base, attn, pctx, x, settings["kernels"], ctx_factory, dev,
                                      settings["repeats"], settings["warmup"]))
            del attn, pos, pctx, x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _kernels_for(kernels: Optional[Sequence[str]], device: torch.device) -> list[str]:
    valid = ["default", *FORCEABLE_KERNELS]
    if kernels is None:
        return valid if device.type == "cuda" else ["default"]
    for k in kernels:
        if k not in valid:
            raise ConfigError(f"--kernels: unknown kernel '{k}'{did_you_mean(k, valid)}; choose from {', '.join(valid)}")
    return list(dict.fromkeys(kernels))


def sdpa_kernel_used(fn: Callable[[], Any]) -> str:
    """Which SDPA kernel ``fn`` runs: the kernel op F.scaled_dot_product_attention dispatched to,
    'math' when SDPA was called but decomposed into plain ops, 'explicit' when SDPA was never
    called (matmul + softmax written out). An exception from ``fn`` (a forced kernel that cannot
    run) propagates."""
    try:
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # pragma: no cover - very old torch
        return "unknown"
    ops: set = set()
    calls: list = []

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(str(func))
            return func(*args, **(kwargs or {}))

    class _Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with _Calls(), _Ops():  # grad stays on: some kernels are picked differently when a backward follows
        fn()
    for op, label in _SDPA_OPS:
        if any(name == f"aten.{op}.default" or name.startswith(f"aten.{op}.") for name in ops):
            return label
    return "math" if calls else "explicit"


def _time_kernels(base: dict, attn, pctx, x, kernels: list[str], ctx_factory, device: torch.device,
                  repeats: int, warmup: int) -> list[dict]:
    """One row per kernel for one module at one length; a kernel that cannot run is a row too."""
    trains_on = KINDS["attention"].attr(type(attn), "trains_on")
    if trains_on is not None and device.type not in trains_on:  # no backward here (FlexAttention on the CPU)
        return [dict(base, kernel="default", kernel_used=None, status="unsupported", fwd_bwd_ms=None, times_ms=None,
                     peak_mem_bytes=None, error=f"trains on {', '.join(sorted(trains_on))} only: torch has no "
                                                f"backward for it on {device.type}")]
    grad_out: dict = {}

    def forward():
        with ctx_factory():
            return attn(x, pctx)

    def clear_grads():
        attn.zero_grad(set_to_none=True)
        x.grad = None

    def fwd_bwd():
        clear_grads()
        y = forward()
        g = grad_out.get("g")
        if g is None or g.dtype != y.dtype:
            g = grad_out["g"] = torch.randn_like(y)
        y.backward(g)

    try:
        default_kernel = sdpa_kernel_used(forward)
    except Exception:  # noqa: BLE001 - the default row below reports it
        default_kernel = None
    out = []
    for kernel in kernels:
        if kernel != "default" and default_kernel in ("explicit", None):
            continue  # forcing an SDPA kernel means nothing to an attention that calls none
        row = dict(base, kernel=kernel, kernel_used=None, status="ok", error=None, fwd_bwd_ms=None, times_ms=None,
                   peak_mem_bytes=None)
        out.append(_time_kernel(row, default_kernel, forward, fwd_bwd, clear_grads, device, repeats, warmup))
    return out


def _time_kernel(row: dict, default_kernel: Optional[str], forward: Callable, fwd_bwd: Callable,
                 clear_grads: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> dict:
    """Fill in ``row`` for its kernel: the kernel that really ran, times and peak memory, or why it
    could not run (out of memory; unsupported when a forced kernel refuses; else failed)."""
    kernel = row["kernel"]
    stage = "run"
    try:
        with forced_kernel(kernel):
            stage = "probe"
            with warnings.catch_warnings(record=True) as caught:  # torch's reasons a kernel cannot run
                warnings.simplefilter("always")
                row["kernel_used"] = default_kernel if kernel == "default" else sdpa_kernel_used(forward)
            stage = "run"
            for _ in range(warmup):
                fwd_bwd()
            times = time_calls(fwd_bwd, repeats, device)
            clear_grads()
            with peak_memory(device) as mem:
                fwd_bwd()
    except Exception as exc:  # noqa: BLE001 - one row fails, the table goes on
        row["error"] = short_error(exc, 400)
        if stage == "probe" and caught:
            row["error"] += " | " + " | ".join(" ".join(str(w.message).split())[:200] for w in caught)
        if is_oom(exc):
            row["status"] = "out of memory"
        elif kernel != "default" and (stage == "probe" or isinstance(exc, RuntimeError)):
            row["status"] = "unsupported"
        else:
            row["status"] = "failed"
        clear_grads()
        return row
    row["times_ms"] = milliseconds(times)
    row["fwd_bwd_ms"] = median(times) * 1e3
    if mem["peak"] is not None:
        row["peak_mem_bytes"] = mem["peak"] - mem["base"]
    return row


@contextmanager
def forced_kernel(kernel: str):
    """Restrict SDPA to one kernel for the block ('default': no restriction)."""
    if kernel == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, FORCEABLE_KERNELS[kernel], None)
    if backend is None:
        raise RuntimeError(f"this torch has no SDPBackend.{FORCEABLE_KERNELS[kernel]}")
    with sdpa_kernel(backend):
        yield


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Set time_vs_base and mem_vs_base on every row: it over the baseline attention's default-kernel
    row at the same length (None where either side has no figure)."""
    base = {r["seq_len"]: r for r in rows if r["attention"] == baseline and r["kernel"] == "default"
            and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["seq_len"])
        r["time_vs_base"] = (r["fwd_bwd_ms"] / b["fwd_bwd_ms"]) if b and r["fwd_bwd_ms"] and b["fwd_bwd_ms"] else None
        r["mem_vs_base"] = (r["peak_mem_bytes"] / b["peak_mem_bytes"]
                            if b and r["peak_mem_bytes"] and b["peak_mem_bytes"] else None)
