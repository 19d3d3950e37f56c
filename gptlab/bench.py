"""``gptlab bench``: time attention implementations and whole models, on CPU or GPU.

``gptlab bench attention``  forward+backward time and peak memory of one attention module per
                            registered implementation (and, on CUDA, per forced SDPA kernel), at
                            several sequence lengths.
``gptlab bench model``      training-step throughput (tokens/s, TFLOP/s, MFU, peak memory beside
                            the estimate), eager and ``--compile``d, plus generation tokens/s with
                            and without the KV cache.

Method (the same for every row, so rows can be compared):
- timings are the median of ``--repeats``/``--steps`` timed calls after ``--warmup`` untimed ones;
  on CUDA each call sits between two CUDA events and the host synchronises once at the end, so
  timing adds no host/device round trip; elsewhere the device is synchronised around each call;
- peak memory is ``torch.cuda.max_memory_allocated`` (CUDA only; ``n/a`` elsewhere);
- ``bf16`` runs under ``torch.autocast(dtype=bfloat16)`` with float32 weights, like training;
- every report starts with the device, dtype, torch version, the settings and a command that
  reruns it; ``--json`` prints the same as one JSON object.

Like the rest of the core, nothing here names a variant: attention implementations come from the
registry, and which SDPA kernel actually ran is read from the profiler (the aten op dispatched).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .errors import ConfigError, did_you_mean

DTYPES = ("auto", "fp32", "bf16")

# aten ops of F.scaled_dot_product_attention's kernels -> the name reported (most specific first).
_SDPA_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "memory-efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused (backend-specific)"),
    ("_scaled_dot_product_attention_math", "math"),
)
# Kernels ``--kernels`` can force through torch.nn.attention.sdpa_kernel (SDPBackend member names).
_FORCEABLE = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
              "math": "MATH"}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,512,1024, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 256,512,1024, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _intermixed(base: type) -> type:
    """A subclass of the CLI's parser class whose parse accepts positionals after options."""

    class IntermixedParser(base):  # type: ignore[misc, valid-type]
        _intermixing = False

        def parse_known_args(self, args=None, namespace=None):
            if self._intermixing:  # parse_known_intermixed_args calls back here on some Pythons
                return super().parse_known_args(args, namespace)
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False

    return IntermixedParser


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``attention`` and ``model``) to the subparsers action ``sub`` of gptlab's CLI."""
    b = sub.add_parser("bench", help="time attention implementations and models (training, generation)",
                       description="Benchmarks that print the device, dtype, torch version, the settings "
                                   "and a command that reruns them; --json for machine-readable output.")
    # default=SUPPRESS: a --debug given before 'bench' is not reset to False by the subparser
    b.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    # options and key=value overrides may come in any order: `bench model gpt2 --compile n_layers=4`
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCHMARK", parser_class=_intermixed(type(b)))
    bsub.required = True

    a = bsub.add_parser("attention", help="forward+backward time and peak memory of each attention implementation",
                        description="Time one attention module per implementation (built through the registry) "
                                    "on random (batch, T, heads*head_dim) input, causal, forward+backward.")
    a.add_argument("--attention", type=_name_list, default=None, metavar="A,B",
                   help="attention components to time, comma-separated (default: every registered one, "
                        "the model's default attention first); the first is the baseline of the ratio columns")
    a.add_argument("--position", default=None,
                   help="positional scheme whose context (rotation, score bias) attention gets "
                        "(default: the model default)")
    a.add_argument("--seq-lens", type=_int_list, default=[256, 512, 1024], metavar="T1,T2",
                   help="sequence lengths (default: 256,512,1024)")
    a.add_argument("--batch", type=_positive, default=8, help="batch size (default: 8)")
    a.add_argument("--heads", type=_positive, default=12, help="attention heads (default: 12)")
    a.add_argument("--head-dim", type=_positive, default=64, help="dimension per head (default: 64)")
    a.add_argument("--kernels", type=_name_list, default=None, metavar="K,K",
                   help="SDPA kernels to force for attentions that call SDPA, from default,"
                        + ",".join(_FORCEABLE) + " (default: all of them on CUDA, 'default' elsewhere); "
                        "a kernel that cannot run is reported as unsupported")
    _common(a, repeats=True)

    m = bsub.add_parser("model", help="training tokens/s, TFLOP/s, MFU, memory; generation with/without KV cache",
                        description="Time training steps (AdamW, clipping, as `gptlab run` trains) and "
                                    "generation of a model given as a preset name or a YAML/JSON file of "
                                    "model keys, with key=value overrides.")
    m.add_argument("config", metavar="CONFIG_OR_PRESET",
                   help="a preset (gpt2, gpt2-medium, nano, micro, mini, ...) or a YAML/JSON file of model "
                        "keys (a file with a 'model:' section, such as an experiment, also works)")
    m.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="model key overrides, e.g. n_layers=4")
    m.add_argument("--batch", type=_positive, default=8, help="training batch size (default: 8)")
    m.add_argument("--seq-len", type=_positive, default=None, help="training sequence length (default: context_length)")
    m.add_argument("--steps", type=_positive, default=10, help="timed training steps (default: 10)")
    m.add_argument("--compile", action="store_true", help="also time the torch.compile'd model (row 'compiled')")
    m.add_argument("--gen-tokens", type=_non_negative, default=None,
                   help="new tokens per generate call (default: min(128, context - prompt); 0 skips generation)")
    m.add_argument("--prompt-len", type=_positive, default=16, help="prompt length for generation (default: 16)")
    m.add_argument("--gen-batch", type=_positive, default=1, help="prompts generated at once (default: 1)")
    m.add_argument("--gen-repeats", type=_positive, default=3, help="timed generate calls (default: 3)")
    m.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default: 0)")
    _common(m, repeats=False)
    return b


def _common(p: argparse.ArgumentParser, repeats: bool) -> None:
    if repeats:
        p.add_argument("--repeats", type=_positive, default=10, help="timed repeats; the median is reported (default: 10)")
    p.add_argument("--warmup", type=_non_negative, default=3, help="untimed warm-up calls (default: 3)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="fp32, or bf16 autocast (default auto: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--plugins-dir", type=Path, action="append", default=[], help="extra plugin folder (repeatable)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 gives steadier CPU timings on a "
                        "machine whose cores are shared")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``gptlab bench attention`` or ``gptlab bench model``; returns the exit status."""
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        if args.bench_command == "attention":
            result = bench_attention(args)
            _emit(result, args.json, _print_attention)
        elif args.bench_command == "model":
            result = bench_model(args)
            _emit(result, args.json, _print_model)
        else:  # pragma: no cover - argparse only offers the two
            raise ConfigError(f"unknown benchmark '{args.bench_command}'; use attention or model")
    finally:
        torch.set_num_threads(threads)
    return 1 if result.get("failed") else 0


def _emit(result: dict, as_json: bool, printer: Callable[[dict], None]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        printer(result)


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by benchmarks/vs_reference.py)
# ----------------------------------------------------------------------------------------------
def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere (the rule of train.precision=auto)."""
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, dtype: str) -> Callable[[], Any]:
    """A factory of the forward-pass context: bf16 autocast, or nothing for fp32."""
    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def environment(device: torch.device, dtype: str) -> dict:
    """What a reader needs to know about the machine to interpret (and rerun) a benchmark."""
    from . import __version__
    from .devices import device_name

    env = {"device": device_name(device), "device_type": device.type, "dtype": dtype,
           "torch": torch.__version__, "gptlab": __version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        env["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        env["load_avg"] = None
    return env


def time_calls(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Seconds taken by each of ``n`` calls of ``fn``.

    CUDA: a pair of CUDA events around each call and one synchronize at the end, so the host never
    waits inside the loop. Elsewhere: synchronize, perf_counter, call, synchronize, perf_counter.
    """
    from .devices import synchronize

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
    """Yield a dict that holds, afterwards, ``peak`` (max_memory_allocated during the block) and
    ``base`` (memory_allocated at its start), in bytes; both None off CUDA."""
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


def make_train_step(step_model: torch.nn.Module, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    ctx: Callable[[], Any], x: torch.Tensor, y: torch.Tensor,
                    grad_clip: Optional[float] = 1.0,
                    logits_of: Callable[[Any], torch.Tensor] = lambda out: out) -> Callable[[], torch.Tensor]:
    """One training step as ``gptlab.train`` takes it: autocast forward, float32 cross-entropy,
    backward, gradient clipping, AdamW step, zero_grad(set_to_none). Returns the (device) loss."""
    params = list(params)

    def step() -> torch.Tensor:
        with ctx():
            logits = logits_of(step_model(x))
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_settings(dtype: str):
    """gptlab's default TrainConfig (AdamW lr, betas, weight decay, clipping) at this precision."""
    from .settings import TrainConfig

    return TrainConfig(precision=dtype)


def _short_error(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def _command(words: list) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def _median(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------------------------
# gptlab bench attention
# ----------------------------------------------------------------------------------------------
def sdpa_kernel_used(fn: Callable[[], Any]) -> str:
    """Which SDPA kernel ``fn`` runs: the kernel op F.scaled_dot_product_attention dispatched to
    (seen by a dispatch mode), 'math' when SDPA was called but decomposed into plain ops,
    'explicit' when SDPA was not called at all (e.g. matmul + softmax written out).
    Exceptions from ``fn`` propagate (a forced kernel that cannot run)."""
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

    with _Calls(), _Ops():  # grad stays on: some kernels are chosen differently when a backward follows
        fn()
    for op, label in _SDPA_OPS:
        if any(name == f"aten.{op}.default" or name.startswith(f"aten.{op}.") for name in ops):
            return label
    return "math" if calls else "explicit"


def _kernels_for(args: argparse.Namespace, device: torch.device) -> list[str]:
    valid = ["default", *_FORCEABLE]
    if args.kernels is None:
        return valid if device.type == "cuda" else ["default"]
    for k in args.kernels:
        if k not in valid:
            raise ConfigError(f"--kernels: unknown kernel '{k}'{did_you_mean(k, valid)}; choose from {', '.join(valid)}")
    return list(dict.fromkeys(args.kernels))


def _shared_flags(args: argparse.Namespace) -> list:
    """The options both benchmarks take, as they appear on a rerun command line."""
    words = ["--threads", args.threads] if args.threads else []
    for d in args.plugins_dir:
        words += ["--plugins-dir", d]
    return words + (["--json"] if args.json else [])


def _attention_command(args: argparse.Namespace, names: list[str], position: str, device: torch.device,
                       dtype: str, kernels: list[str]) -> str:
    words = ["gptlab", "bench", "attention", "--attention", ",".join(names), "--position", position,
             "--seq-lens", ",".join(map(str, args.seq_lens)), "--batch", args.batch, "--heads", args.heads,
             "--head-dim", args.head_dim, "--kernels", ",".join(kernels), "--repeats", args.repeats,
             "--warmup", args.warmup, "--device", str(device), "--dtype", dtype]
    return _command(words + _shared_flags(args))


def bench_attention(args: argparse.Namespace) -> dict:
    """Forward+backward of one attention module per (seq_len, implementation, kernel); see the module doc."""
    from .config import ModelConfig
    from .devices import resolve_device
    from .model import resolve_components
    from .plugin_manager import build_plugin_system

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    plugins = build_plugin_system(plugin_dirs=args.plugins_dir)
    default_attention = ModelConfig().attention.name  # the ratio baseline: the model's default attention
    registered = sorted(plugins.registry.names("attention"), key=lambda n: n != default_attention)
    names = list(dict.fromkeys(args.attention or registered))
    position = args.position or ModelConfig().position.name
    kernels = _kernels_for(args, device)
    C = args.heads * args.head_dim
    t_max = max(args.seq_lens)
    ctx_factory = autocast(device, dtype)

    built = {}
    for name in names:  # resolve every pair before allocating anything: bad names fail at once
        cfg = ModelConfig.from_any({"vocab_size": 1, "context_length": t_max, "emb_dim": C, "n_heads": args.heads,
                                    "n_layers": 1, "drop_rate": 0.0, "attention": name, "position": position})
        built[name] = (cfg, resolve_components(cfg, plugins))

    settings = {"attention": names, "position": position, "seq_lens": args.seq_lens, "batch": args.batch,
                "heads": args.heads, "head_dim": args.head_dim, "emb_dim": C, "kernels": kernels,
                "repeats": args.repeats, "warmup": args.warmup, "causal": True, "pass": "forward+backward"}
    rows: list[dict] = []
    for T in args.seq_lens:
        for name in names:
            cfg, entries = built[name]
            torch.manual_seed(0)
            attn = entries["attention"].factory(cfg, **cfg.attention.options).to(device).train()
            pos = entries["position"].factory(cfg, **cfg.position.options).to(device)
            pctx = pos.context(0, T, device, torch.float32)
            x = torch.randn(args.batch, T, C, device=device, requires_grad=True)
            rows.extend(_bench_one_attention(name, attn, pctx, x, T, kernels, ctx_factory, device, args))
            del attn, pos, pctx, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _add_ratios(rows, names[0])
    env = environment(device, dtype)
    return {"benchmark": "attention", "env": env, "settings": settings,
            "command": _attention_command(args, names, position, device, dtype, kernels),
            "argv": _command(sys.argv), "baseline": names[0], "rows": rows,
            "failed": any(r["status"] == "failed" for r in rows)}


def _bench_one_attention(name, attn, pctx, x, T, kernels, ctx_factory, device, args) -> list[dict]:
    grad_out: dict = {}

    def forward():
        with ctx_factory():
            return attn(x, pctx)

    def fwd_bwd():
        attn.zero_grad(set_to_none=True)
        x.grad = None
        y = forward()
        g = grad_out.get("g")
        if g is None or g.dtype != y.dtype:
            g = grad_out["g"] = torch.randn_like(y)
        y.backward(g)

    base = {"attention": name, "seq_len": T, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim}
    try:
        default_kernel = sdpa_kernel_used(forward)
    except Exception:  # noqa: BLE001 - reported by the default row below
        default_kernel = None
    out = []
    for kernel in kernels:
        if kernel != "default" and default_kernel in ("explicit", None):
            continue  # forcing an SDPA kernel means nothing to an attention that calls none
        row = dict(base, kernel=kernel, kernel_used=None, status="ok", error=None, fwd_bwd_ms=None, times_ms=None,
                   peak_mem_bytes=None)
        stage = "run"
        try:
            with _forced_kernel(kernel):
                stage = "probe"
                with warnings.catch_warnings(record=True) as caught:  # torch says why a kernel cannot run
                    warnings.simplefilter("always")
                    row["kernel_used"] = default_kernel if kernel == "default" else sdpa_kernel_used(forward)
                stage = "run"
                for _ in range(args.warmup):
                    fwd_bwd()
                times = time_calls(fwd_bwd, args.repeats, device)
                attn.zero_grad(set_to_none=True)
                x.grad = None
                with peak_memory(device) as mem:
                    fwd_bwd()
        except Exception as exc:  # noqa: BLE001 - one row fails, the table goes on
            row["error"] = _short_error(exc, 400)
            if stage == "probe" and caught:
                row["error"] += " | " + " | ".join(" ".join(str(w.message).split())[:200] for w in caught)
            if _is_oom(exc):
                row["status"] = "out of memory"
            elif kernel != "default" and (stage == "probe" or isinstance(exc, RuntimeError)):
                row["status"] = "unsupported"
            else:
                row["status"] = "failed"
            out.append(row)
            attn.zero_grad(set_to_none=True)
            x.grad = None
            continue
        row["times_ms"] = [round(t * 1e3, 4) for t in times]
        row["fwd_bwd_ms"] = _median(times) * 1e3
        if mem["peak"] is not None:
            row["peak_mem_bytes"] = mem["peak"] - mem["base"]
        out.append(row)
    return out


@contextmanager
def _forced_kernel(kernel: str):
    if kernel == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _FORCEABLE[kernel], None)
    if backend is None:
        raise RuntimeError(f"this torch has no SDPBackend.{_FORCEABLE[kernel]}")
    with sdpa_kernel(backend):
        yield


def _add_ratios(rows: list[dict], baseline: str) -> None:
    """time_vs_base / mem_vs_base: this row over the baseline attention's default row at the same T."""
    base = {r["seq_len"]: r for r in rows if r["attention"] == baseline and r["kernel"] == "default"
            and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["seq_len"])
        r["time_vs_base"] = (r["fwd_bwd_ms"] / b["fwd_bwd_ms"]) if b and r["fwd_bwd_ms"] and b["fwd_bwd_ms"] else None
        r["mem_vs_base"] = (r["peak_mem_bytes"] / b["peak_mem_bytes"]
                            if b and r["peak_mem_bytes"] and b["peak_mem_bytes"] else None)


# ----------------------------------------------------------------------------------------------
# gptlab bench model
# ----------------------------------------------------------------------------------------------
def load_model_config(spec: str, overrides: Iterable[str] = ()):
    """A ModelConfig from a preset name or a YAML/JSON file of model keys, plus key=value overrides.

    A file may hold the model keys at its top level or under ``model:`` (an experiment file), and
    may name a ``preset`` that its other keys override. Overrides may be written ``n_layers=4``
    or ``model.n_layers=4``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import ModelConfig
    from .experiment import parse_overrides
    from .presets import PRESETS

    path = Path(spec)
    if spec in PRESETS:
        raw: dict = dict(PRESETS[spec])
        where = f"preset '{spec}'"
    elif path.is_file():
        raw = _read_config_file(path)
        where = str(path)
    elif path.suffix.lower() in (".yaml", ".yml", ".json") or os.sep in spec or "/" in spec:
        raise ConfigError(f"{spec}: no such file; pass a preset ({', '.join(PRESETS)}) "
                          f"or a YAML/JSON file of model keys")
    else:
        raise ConfigError(f"unknown model preset '{spec}'{did_you_mean(spec, PRESETS)}; presets: "
                          f"{', '.join(PRESETS)}; or pass a YAML/JSON file of model keys")
    preset = raw.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}: unknown model preset '{preset}'{did_you_mean(preset, PRESETS)}; "
                              f"presets: {', '.join(PRESETS)}")
        raw = {**PRESETS[preset], **raw}
    overrides = list(overrides)
    if overrides:
        ov = OmegaConf.to_container(parse_overrides(overrides), resolve=True)
        nested = ov.pop("model", None)
        if isinstance(nested, dict):
            ov = {**ov, **nested}
        try:
            raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(raw), OmegaConf.create(ov)), resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {' '.join(str(exc).split())}") from None
    try:
        return ModelConfig.from_any(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _read_config_file(path: Path) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
        else:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, UnicodeDecodeError, ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: cannot read it as {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                          f"({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model keys, got {type(data).__name__}")
    if isinstance(data.get("model"), dict):
        data = data["model"]
    return dict(data)


def _model_command(args: argparse.Namespace, device: torch.device, dtype: str, seq_len: int, gen_tokens: int) -> str:
    words = ["gptlab", "bench", "model", args.config, *args.overrides, "--batch", args.batch, "--seq-len", seq_len,
             "--steps", args.steps, "--warmup", args.warmup, "--device", str(device), "--dtype", dtype,
             "--gen-tokens", gen_tokens, "--prompt-len", args.prompt_len, "--gen-batch", args.gen_batch,
             "--gen-repeats", args.gen_repeats, "--seed", args.seed]
    if args.compile:
        words.append("--compile")
    return _command(words + _shared_flags(args))


def bench_model(args: argparse.Namespace) -> dict:
    """Training-step and generation throughput of one model; see the module doc."""
    from .devices import peak_flops, resolve_device
    from .model import GPTModel
    from .plugin_manager import build_plugin_system

    cfg = load_model_config(args.config, args.overrides)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    plugins = build_plugin_system(plugin_dirs=args.plugins_dir)
    seq_len = args.seq_len or cfg.context_length
    torch.manual_seed(args.seed)
    model = GPTModel(cfg, plugins=plugins)
    if model.max_length is not None and seq_len > model.max_length:
        raise ConfigError(f"--seq-len {seq_len} is longer than position '{model.components['position']}' "
                          f"supports ({model.max_length}); lower it or raise context_length")
    gen_tokens = _gen_tokens(args, model)
    model.to(device)
    flops = model.flops_per_token(seq_len)
    estimate = model.memory_estimate(args.batch, seq_len, dtype="bfloat16" if dtype == "bf16" else "float32")
    peak = peak_flops(device)
    settings = {"config": args.config, "overrides": list(args.overrides), "batch": args.batch, "seq_len": seq_len,
                "tokens_per_step": args.batch * seq_len, "steps": args.steps, "warmup": args.warmup,
                "compile": args.compile, "optimizer": "AdamW (gptlab train defaults)",
                "gen_tokens": gen_tokens, "prompt_len": args.prompt_len, "gen_batch": args.gen_batch,
                "gen_repeats": args.gen_repeats, "seed": args.seed}
    t = train_settings(dtype)
    settings.update(lr=t.lr, weight_decay=t.weight_decay, betas=[t.beta1, t.beta2], grad_clip=t.grad_clip)
    info = {"components": dict(model.components), "config": cfg.to_dict(), "parameters": model.num_parameters(),
            "flops_per_token": flops, "peak_flops": peak, "memory_estimate": estimate}

    train_rows = [_bench_train(model, "eager", args, device, dtype, seq_len, flops, peak, estimate)]
    if args.compile:
        train_rows.append(_bench_train(model, "compiled", args, device, dtype, seq_len, flops, peak, estimate))
    gen_rows = _bench_generate(model, args, device, dtype, gen_tokens) if gen_tokens else []
    env = environment(device, dtype)
    return {"benchmark": "model", "env": env, "settings": settings, "model": info,
            "command": _model_command(args, device, dtype, seq_len, gen_tokens), "argv": _command(sys.argv),
            "train": train_rows, "generate": gen_rows,
            "failed": any(r["status"].startswith(("failed", "out of memory")) for r in train_rows + gen_rows)}


def _gen_tokens(args: argparse.Namespace, model) -> int:
    limit = model.max_length
    if args.gen_tokens is None:
        room = 128 if limit is None else limit - args.prompt_len
        if room <= 0:
            raise ConfigError(f"--prompt-len {args.prompt_len} leaves no room to generate within the model's "
                              f"{limit} positions; lower --prompt-len")
        return min(128, room)
    if args.gen_tokens and limit is not None and args.prompt_len + args.gen_tokens > limit:
        raise ConfigError(f"--prompt-len {args.prompt_len} + --gen-tokens {args.gen_tokens} exceeds the "
                          f"{limit} positions position '{model.components['position']}' supports (the KV cache "
                          f"would be dropped); lower one of them")
    return args.gen_tokens


def _bench_train(model, mode: str, args, device, dtype, seq_len, flops, peak, estimate) -> dict:
    from .train import make_optimizer

    row = {"mode": mode, "status": "ok", "step_ms": None, "tokens_per_s": None, "tflops": None, "mfu": None,
           "peak_mem_bytes": None, "est_mem_bytes": estimate["total"], "compile_s": None, "times_ms": None}
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (args.batch, seq_len), generator=g).to(device)
    y = torch.randint(0, vocab, (args.batch, seq_len), generator=g).to(device)
    model.train()
    optimizer = make_optimizer(model, train_settings(dtype), device)
    step_model = model
    try:
        if mode == "compiled":
            step_model = torch.compile(model)
        step = make_train_step(step_model, model.parameters(), optimizer, autocast(device, dtype), x, y,
                               train_settings(dtype).grad_clip)
        if mode == "compiled":  # the first call compiles; time it apart from the warm-up
            row["compile_s"] = time_calls(step, 1, device)[0]
        for _ in range(args.warmup):
            step()
        with peak_memory(device) as mem:
            times = time_calls(step, args.steps, device)
    except Exception as exc:  # noqa: BLE001 - a failed mode is a row, not a crash
        if _is_oom(exc):
            row["status"] = "out of memory"
        elif mode == "compiled":
            row["status"] = f"compile failed: {_short_error(exc)}"
        else:
            row["status"] = f"failed: {_short_error(exc)}"
        return row
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if mode == "compiled":
            _reset_dynamo()
    step_s = _median(times)
    row["times_ms"] = [round(t * 1e3, 4) for t in times]
    row["step_ms"] = step_s * 1e3
    row["tokens_per_s"] = args.batch * seq_len / step_s
    row["tflops"] = row["tokens_per_s"] * flops / 1e12
    row["mfu"] = row["tokens_per_s"] * flops / peak if peak else None
    row["peak_mem_bytes"] = mem["peak"]
    return row


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - best effort
        pass


def _bench_generate(model, args, device, dtype, gen_tokens: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    idx = torch.randint(0, model.config.vocab_size, (args.gen_batch, args.prompt_len), generator=g).to(device)
    ctx = autocast(device, dtype)
    rows, outputs = [], {}
    for use_cache in (True, False):
        mode = "kv cache" if use_cache else "no cache"
        row = {"mode": mode, "use_cache": use_cache, "status": "ok", "new_tokens": gen_tokens,
               "prompt_len": args.prompt_len, "batch": args.gen_batch, "tokens_per_s": None, "ms_per_token": None,
               "times_ms": None, "same_tokens_as_cache": None}

        def run(n: int = gen_tokens, keep: bool = False) -> None:
            with ctx():
                out = model.generate(idx, n, temperature=0, use_cache=use_cache)
            if keep:
                outputs[use_cache] = out

        try:
            for _ in range(max(1, min(args.warmup, 2))):
                run(min(8, gen_tokens))
            times = time_calls(run, args.gen_repeats, device)
            run(keep=True)
        except Exception as exc:  # noqa: BLE001
            row["status"] = "out of memory" if _is_oom(exc) else f"failed: {_short_error(exc)}"
            rows.append(row)
            continue
        s = _median(times)
        row["times_ms"] = [round(t * 1e3, 4) for t in times]
        row["tokens_per_s"] = args.gen_batch * gen_tokens / s
        row["ms_per_token"] = s * 1e3 / gen_tokens
        rows.append(row)
    if True in outputs and False in outputs:
        same = bool(torch.equal(outputs[True], outputs[False]))
        for r in rows:
            r["same_tokens_as_cache"] = same
    return rows


# ----------------------------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = "{:,.1f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return spec.format(v)


def _mib(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.1f} MiB"


def _print_header(console, title: str, result: dict) -> None:
    env = result["env"]
    load = env.get("load_avg")
    console.print(f"[bold]{title}[/]")
    console.print(f"device: {env['device']}  dtype: {env['dtype']}  torch {env['torch']}"
                  f"{'  cuda ' + env['cuda'] if env.get('cuda') else ''}  gptlab {env['gptlab']}  "
                  f"python {env['python']}" + (f"  load avg {load[0]:.2f}" if load else ""), soft_wrap=True)
    console.print("settings: " + ", ".join(f"{k}={_plain(v)}" for k, v in result["settings"].items()),
                  soft_wrap=True)
    console.print(f"rerun: {result['command']}", soft_wrap=True)


def _plain(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "-"
    return str(v)


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # piped to a file: do not squeeze the tables into 80 columns
        console = Console(highlight=False, width=160)
    return console


def _print_attention(result: dict) -> None:
    from rich.table import Table

    console = _console()
    _print_header(console, "gptlab bench attention", result)
    base = result["baseline"]
    table = Table(title=f"attention forward+backward (median of {result['settings']['repeats']}, causal)")
    for col in ("T", "attention", "kernel", "kernel used", "fwd+bwd ms", "peak mem", f"time vs {base}",
                f"mem vs {base}"):
        table.add_column(col, justify="left" if col in ("attention", "kernel", "kernel used") else "right")
    last_t = None
    for r in result["rows"]:
        if last_t is not None and r["seq_len"] != last_t:
            table.add_section()
        last_t = r["seq_len"]
        ok = r["status"] == "ok"
        table.add_row(str(r["seq_len"]), r["attention"], r["kernel"], r["kernel_used"] or "-",
                      _fmt(r["fwd_bwd_ms"], "{:,.2f}") if ok else r["status"], _mib(r["peak_mem_bytes"]),
                      _fmt(r["time_vs_base"], "{:.2f}x"), _fmt(r["mem_vs_base"], "{:.2f}x"))
    console.print(table)
    if result["env"]["device_type"] != "cuda":
        console.print("peak memory is measured on CUDA only (n/a here); SDPA kernels are forced on CUDA only "
                      "unless --kernels is given")


def _print_model(result: dict) -> None:
    from rich.table import Table

    from .fmt import nbytes

    console = _console()
    _print_header(console, "gptlab bench model", result)
    info, s = result["model"], result["settings"]
    est = info["memory_estimate"]
    console.print(f"model: {info['parameters']:,} parameters, {info['flops_per_token'] / 1e6:,.1f} MFLOP/token "
                  f"(6N + 12LHQT at T={s['seq_len']}); memory estimate {nbytes(est['total'], 2)} "
                  f"(weights {nbytes(est['weights'], 2)}, grads {nbytes(est['gradients'], 2)}, "
                  f"AdamW {nbytes(est['optimizer'], 2)}, activations {nbytes(est['activations'], 2)}); "
                  f"components: " + ", ".join(f"{k}={v}" for k, v in info["components"].items()), soft_wrap=True)
    table = Table(title=f"training step: batch {s['batch']} x {s['seq_len']} tokens, median of {s['steps']} steps")
    for col in ("mode", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak mem", "estimate", "compile s"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in result["train"]:
        if r["status"] != "ok":
            table.add_row(r["mode"], r["status"], "", "", "", "", _mib(r["est_mem_bytes"]), "")
            continue
        table.add_row(r["mode"], _fmt(r["step_ms"], "{:,.2f}"), _fmt(r["tokens_per_s"], "{:,.0f}"),
                      _fmt(r["tflops"], "{:,.3f}"), _fmt(r["mfu"], "{:.1%}"), _mib(r["peak_mem_bytes"]),
                      _mib(r["est_mem_bytes"]), _fmt(r["compile_s"], "{:.1f}"))
    console.print(table)
    if result["generate"]:
        console.print(f"generation: {s['gen_batch']} x ({s['prompt_len']}-token prompt + {s['gen_tokens']} new "
                      f"tokens), greedy, median of {s['gen_repeats']} calls")
        g = Table(title="generation")
        for col in ("mode", "tokens/s", "ms/token", "same tokens"):
            g.add_column(col, justify="left" if col == "mode" else "right")
        for r in result["generate"]:
            same = r["same_tokens_as_cache"]
            g.add_row(r["mode"], _fmt(r["tokens_per_s"], "{:,.1f}") if r["status"] == "ok" else r["status"],
                      _fmt(r["ms_per_token"], "{:,.2f}"), "n/a" if same is None else ("yes" if same else "no"))
        console.print(g)
    if info["peak_flops"] is None:
        console.print("MFU needs a known GPU peak (n/a here); peak memory is measured on CUDA only")
    else:
        console.print(f"MFU against the dense bf16 peak {info['peak_flops'] / 1e12:,.0f} TFLOP/s")
