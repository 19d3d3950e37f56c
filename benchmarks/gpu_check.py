"""Validate gptlab's GPU path with one command, and write what it found as a Markdown report.

    python benchmarks/gpu_check.py                      # on a GPU machine: < 8 min on one H100
    python benchmarks/gpu_check.py --threads 1          # no GPU: the same checks, tiny sizes, CPU

Eight checks, each PASS, FAIL or N/A (a check this gptlab cannot run yet):

  1 logits                      every built-in attention x position: the same weights give the same
                                fp32 logits on CUDA as on the CPU (max |diff| <= 1e-4); without a
                                GPU, CPU float32 against CPU float64
  2 bf16 training               a small model trained under bf16 autocast: finite loss that falls
  3 torch.compile               every attention x position compiled (benchmarks/compile_matrix.py's
                                check): matches eager, and how many graph breaks
  4 SDPA kernel                 the kernel F.scaled_dot_product_attention really ran; on CUDA it must
                                be a fused kernel that never stores the T x T matrix (FUSED_KERNELS)
  5 model throughput            GPT-2 124M, T=1024, bf16, compiled: training tokens/s and MFU
  6 attention vanilla vs sdpa   forward+backward time and peak memory at T=1024 and 2048
  7 vs Hugging Face             benchmarks/vs_reference.py: gptlab / HF GPT-2 training tokens/s
  8 DDP torchrun                a one-process ``torch.distributed.run`` of ``gptlab run`` completes
                                and its summary.json says world_size 1

The report is rewritten after every check, so a run cut short keeps what it measured.

Performance targets (MFU >= 40%, aim 45%, on an H100/H200; sdpa >= 2x faster and >= 5x less memory than vanilla
at T=2048; gptlab >= 1.0x Hugging Face) are reported as met / not met next to the checks; they do
not change the exit status, which is 0 when every check passes and 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

_START = time.perf_counter()  # the report's wall time counts torch's import too

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # compile_matrix and vs_reference live beside this script

LOGITS_TOL = 1e-4
CHECKS = ("logits", "bf16 training", "torch.compile", "SDPA kernel", "model throughput",
          "attention vanilla vs sdpa", "vs Hugging Face", "DDP torchrun")
MFU_TARGET = 0.40  # llm.c's ~40% on an H100
MFU_AIM = 0.45
SDPA_SPEEDUP_TARGET = 2.0
SDPA_MEMORY_TARGET = 5.0
HF_TARGET = 1.0
TARGET_SEQ_LEN = 2048  # the attention targets are stated at this length

# The SDPA kernels check 4 accepts on CUDA: fused ones that never store the T x T score matrix.
# Without a score bias torch may pick flash or cuDNN (torch >= 2.10 puts cuDNN first on H100/H200
# when its bundled cuDNN is newer than 9.15); a score bias (ALiBi) rules flash out, and then the
# memory-efficient kernel or cuDNN, which both take an additive mask, is what a fused run uses.
FUSED_KERNELS = {False: ("flash", "cudnn"), True: ("memory-efficient", "cudnn")}  # keyed by "has a score bias"

# Every size in one place: the GPU column is what the targets are stated for; the CPU column keeps
# the same checks affordable in CI (about a minute on one thread).
SIZES = {
    "gpu": {
        "logits": dict(preset="micro", batch=4, seq_len=128),
        "train": dict(preset="micro", batch=16, seq_len=128, steps=40, lr=1e-3),
        "compile": dict(backend="inductor", batch=2),
        "kernel": dict(model=dict(vocab_size=256, context_length=256, emb_dim=256, n_heads=4, n_layers=2,
                                  drop_rate=0.0), batch=2, seq_len=256),
        # batch 32 x 1024 is experiments/gpt2_124m.yaml's step (45.3% MFU on an H200 against 41.7% at 16)
        "model": dict(config="gpt2", overrides=["drop_rate=0.0"], batch=32, seq_len=1024, steps=20, warmup=5),
        "attention": dict(seq_lens=(1024, 2048), batch=8, heads=12, head_dim=64, repeats=10, warmup=3),
        "reference": ["--preset", "gpt2", "--batch", "16", "--seq-len", "1024", "--rounds", "5", "--steps", "3",
                      "--warmup", "3"],
        "ddp": dict(steps=20, batch_size=8, timeout=300),
    },
    "cpu": {
        "logits": dict(preset="nano", batch=2, seq_len=64),
        "train": dict(preset="nano", batch=8, seq_len=64, steps=30, lr=1e-3),
        "compile": dict(backend="aot_eager", batch=2),  # inductor's cold C++ build alone takes minutes here
        "kernel": dict(model=dict(vocab_size=256, context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                                  drop_rate=0.0), batch=2, seq_len=64),
        "model": dict(config="nano", overrides=[], batch=4, seq_len=64, steps=5, warmup=2),
        "attention": dict(seq_lens=(64, 128), batch=2, heads=4, head_dim=32, repeats=3, warmup=1),
        "reference": ["--layers", "2", "--width", "64", "--heads", "4", "--ctx", "64", "--vocab", "256",
                      "--batch", "2", "--rounds", "3", "--steps", "2", "--warmup", "1"],
        "ddp": dict(steps=5, batch_size=4, timeout=180),
    },
}


@dataclass
class Result:
    """One check's outcome: what the summary row and its report section show."""

    name: str
    status: str = "FAIL"  # PASS, FAIL or N/A
    summary: str = ""
    lines: list = field(default_factory=list)  # the Markdown of its section
    figures: dict = field(default_factory=dict)  # numbers the targets read
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = "{:,.1f}") -> str:
    """A number for a table cell; None (not measured here) as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return spec.format(v)


def mib(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.1f} MiB"


def table(header: list, rows: list) -> list:
    """Markdown table lines; '|' inside a cell is escaped so error texts cannot break the table."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return out


def combos(training_on: Optional[str] = None) -> list[tuple[str, str]]:
    """Every registered attention x position, read from the registry so a new built-in is covered;
    with ``training_on`` (a device type), only attentions that can train there (``trains_on``)."""
    from gptlab.plugin.hookspecs import KINDS
    from gptlab.plugin.manager import default_plugins

    from gptlab import ConfigError
    from gptlab.config.model import ModelConfig

    reg = default_plugins().registry

    def trains(name: str) -> bool:
        devices = KINDS["attention"].attr(reg.get("attention", name).factory, "trains_on")
        return training_on is None or devices is None or training_on in devices

    def builds_as_named(name: str) -> bool:  # one that needs an option (flex_document's separator) is left out
        try:
            reg.lookup("attention", name, {}, ModelConfig())
            return True
        except ConfigError:
            return False

    return [(a, p) for a in reg.names("attention") if trains(a) and builds_as_named(a) for p in reg.names("position")]


def release(device: torch.device) -> None:
    """Drop what the last check left on the device, so the next one measures its own memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exact_fp32():
    """Full-precision fp32 matmuls for the block (TF32 would put CUDA ~1e-3 away from the CPU)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def sharpen_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1)-scale random weights: attention gets sharp, so a wrong mask or position on one device
    moves the logits far past float noise (GPT-2's 0.02 init keeps attention nearly uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * (0.3 if "emb" in name else p.shape[-1] ** -0.5))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


# ----------------------------------------------------------------------------------------------
# the checks: each fills a Result and raises on nothing it can report instead
# ----------------------------------------------------------------------------------------------
def check_logits(r: Result, device: torch.device, s: dict) -> None:
    from gptlab import PRESETS, GPTModel
    from gptlab.errors import IncompatibleComponents

    on_gpu = device.type == "cuda"
    other = "CUDA fp32" if on_gpu else "CPU float64"
    r.lines.append(f"Each model ({s['preset']} preset, batch {s['batch']} x {s['seq_len']}, eval mode, weights at O(1) "
                   f"scale) runs on the CPU in fp32 and, with the same weights and tokens, in {other}; "
                   f"max |logits diff| must be <= {LOGITS_TOL:g}. TF32 is off for this check.")
    rows, worst, bad = [], 0.0, 0
    g = torch.Generator().manual_seed(1)
    for i, (att, pos) in enumerate(combos()):
        try:
            torch.manual_seed(0)
            ref = sharpen_(GPTModel({**PRESETS[s["preset"]], "attention": att, "position": pos}), seed=i).eval()
        except IncompatibleComponents as exc:
            rows.append([att, pos, "skipped", f"{LOGITS_TOL:.0e}", f"incompatible: {exc}"])
            continue
        x = torch.randint(0, ref.config.vocab_size, (s["batch"], s["seq_len"]), generator=g)
        twin = copy.deepcopy(ref)
        twin = twin.to(device) if on_gpu else twin.double()
        with torch.no_grad(), exact_fp32():
            a = ref(x).double()
            b = twin(x.to(device)).double().cpu()
        diff = float((a - b).abs().max())
        ok = math.isfinite(diff) and diff <= LOGITS_TOL
        worst = max(worst, diff) if math.isfinite(diff) else float("inf")
        bad += not ok
        rows.append([att, pos, f"{diff:.2e}", f"{LOGITS_TOL:.0e}", "PASS" if ok else "FAIL"])
        del ref, twin
    r.lines += table(["attention", "position", "max abs diff", "tolerance", "result"], rows)
    r.figures["max_diff"] = worst
    r.status = "PASS" if bad == 0 and rows else "FAIL"
    r.summary = f"max abs diff {worst:.2e} <= {LOGITS_TOL:g} over {len(rows)} combinations ({other} vs CPU fp32)" \
        if not bad else f"{bad} of {len(rows)} combinations differ by more than {LOGITS_TOL:g} (worst {worst:.2e})"


def check_training(r: Result, device: torch.device, s: dict) -> None:
    from gptlab import PRESETS, GPTModel
    from gptlab.bench.timing import autocast
    from gptlab.config.run import TrainConfig
    from gptlab.train.loop import train_step
    from gptlab.train.recipe import make_optimizer

    torch.manual_seed(0)
    model = GPTModel(PRESETS[s["preset"]]).to(device).train()
    t = TrainConfig(precision="bf16", lr=s["lr"])
    opt = make_optimizer(model, t)
    ctx = autocast(device, "bf16")
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, model.config.vocab_size, (s["batch"], s["seq_len"]), generator=g).to(device)
    y = torch.randint(0, model.config.vocab_size, (s["batch"], s["seq_len"]), generator=g).to(device)
    with torch.no_grad(), ctx():  # autocast must really be on: the logits come out in bf16
        logits_dtype = model(x).dtype
    losses = [train_step(model, opt, lambda: (x, y), 1, ctx, t.grad_clip, list(model.parameters()))
              for _ in range(s["steps"])]
    losses = [float(v) for v in torch.stack(losses).cpu()]  # one host read at the end
    finite = all(math.isfinite(v) for v in losses)
    falls = finite and losses[-1] < losses[0]
    ok = finite and falls and logits_dtype == torch.bfloat16
    r.status = "PASS" if ok else "FAIL"
    shown = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
    r.lines.append(f"{s['preset']} preset, one fixed batch of {s['batch']} x {s['seq_len']} random tokens, "
                   f"{s['steps']} AdamW steps (lr {s['lr']:g}, gptlab's train_step) under bf16 autocast. "
                   f"Logits dtype under autocast: {str(logits_dtype).replace('torch.', '')}.")
    r.lines += table(["step", "loss"], [[i + 1, f"{losses[i]:.4f}"] for i in shown])
    r.figures.update(first=losses[0], last=losses[-1])
    why = [] if ok else [w for w, bad in (("a loss is not finite", not finite), ("the loss did not fall", not falls),
                                          ("autocast did not give bf16 logits", logits_dtype != torch.bfloat16))
                         if bad]
    r.summary = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps" + \
        (f"; {', '.join(why)}" if why else "")


def check_compile(r: Result, device: torch.device, s: dict) -> None:
    import compile_matrix as cm

    args = argparse.Namespace(seed=0, backend=s["backend"], mode=None, atol=LOGITS_TOL, allow_graph_breaks=False,
                              no_decode=True)
    seq = cm.TINY["context_length"]
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cm.TINY["vocab_size"], (s["batch"], seq + 1), generator=g)
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    r.lines.append(f"benchmarks/compile_matrix.py's training check per combination: its tiny model "
                   f"({cm.TINY}), batch {s['batch']} x {seq}, fp32, torch.compile backend `{s['backend']}`: "
                   f"one compiled forward+backward against eager (logits and gradients within "
                   f"{LOGITS_TOL:g}), graph breaks counted, and a second step that must not recompile. Its "
                   f"cached-decoding check is left to `python benchmarks/compile_matrix.py --device "
                   f"{device.type}`.")
    rows, failed, breaks = [], 0, 0
    with exact_fp32():
        for att, pos in combos(training_on=device.type):
            row = cm.check_one({"attention": att, "position": pos}, args, device, x, y, None, None)
            if row.get("skipped"):
                rows.append([att, pos, "–", "–", "–", "–", "skipped", row["error"]])
                continue
            failed += not row["ok"]
            breaks += row["graph_breaks"] or 0
            rows.append([att, pos, row["graph_breaks"] if row["graph_breaks"] is not None else "n/a",
                         row["graphs"] if row["graphs"] is not None else "n/a", fmt(row["max_dlogits"], "{:.1e}"),
                         fmt(row["compile_s"], "{:.1f}"), "PASS" if row["ok"] else "FAIL", row["error"] or ""])
    torch._dynamo.reset()
    r.lines += table(["attention", "position", "graph breaks", "graphs", "max abs diff vs eager",
                      "first step s", "result", "problem / note"], rows)
    r.status = "PASS" if failed == 0 and rows else "FAIL"
    r.summary = (f"{len(rows) - failed}/{len(rows)} combinations compiled ({s['backend']}), {breaks} graph "
                 f"breaks in all")


def check_kernels(r: Result, device: torch.device, s: dict) -> None:
    from gptlab import GPTModel
    from gptlab.bench.attention import sdpa_kernel_used
    from gptlab.bench.timing import autocast
    from gptlab.errors import IncompatibleComponents

    on_gpu = device.type == "cuda"
    ctx = autocast(device, "bf16")
    cfg = s["model"]
    r.lines.append(f"A {cfg['n_layers']}-layer model ({cfg['emb_dim']} wide, head dim "
                   f"{cfg['emb_dim'] // cfg['n_heads']}), training mode, bf16 autocast, batch {s['batch']} x "
                   f"{s['seq_len']}; the kernel is read from the aten op dispatched "
                   f"(gptlab.bench.attention.sdpa_kernel_used). 'explicit' means SDPA was not called. "
                   + (f"Required wherever SDPA runs: {' or '.join(FUSED_KERNELS[False])} without a score bias, "
                      f"{' or '.join(FUSED_KERNELS[True])} with one (fused kernels that never store the "
                      f"T x T matrix)." if on_gpu else "No GPU: kernels are reported, no kernel is required."))
    rows, bad = [], 0
    g = torch.Generator().manual_seed(3)
    for att, pos in combos(training_on=device.type):
        try:
            torch.manual_seed(0)
            model = GPTModel({**cfg, "attention": att, "position": pos}).to(device).train()
        except IncompatibleComponents as exc:
            rows.append([att, pos, "–", "skipped", "–", f"incompatible: {exc}"])
            continue
        x = torch.randint(0, cfg["vocab_size"], (s["batch"], s["seq_len"]), generator=g).to(device)
        bias = "score_bias" in getattr(model.position, "provides", ())

        def forward(model=model, x=x):
            with ctx():
                return model(x)

        kernel = sdpa_kernel_used(forward)
        accepted = FUSED_KERNELS[bias] if on_gpu and kernel != "explicit" else ()
        required = " or ".join(accepted) or "–"
        ok = not accepted or kernel in accepted
        bad += not ok
        rows.append([att, pos, "yes" if bias else "no", kernel, required, "PASS" if ok else "FAIL"])
        del model
    r.lines += table(["attention", "position", "score bias", "kernel used", "required", "result"], rows)
    r.figures["kernels"] = {f"{a} {p}": k for a, p, _, k, _, _ in rows}
    r.status = "PASS" if bad == 0 and rows else "FAIL"
    used = sorted({row[3] for row in rows})
    r.summary = (f"kernels seen: {', '.join(used)}" + ("; a fused kernel wherever required" if on_gpu and not bad
                                                        else "")
                 + (f"; {bad} combination(s) not on an accepted fused kernel" if bad else ""))


def check_model(r: Result, device: torch.device, s: dict, threads: Optional[int]) -> None:
    from gptlab.bench.model import bench_model

    res = bench_model(s["config"], s["overrides"], batch=s["batch"], seq_len=s["seq_len"], steps=s["steps"],
                      warmup=s["warmup"], compile=True, gen_tokens=0, device=str(device), dtype="bf16",
                      threads=threads)
    m = res["model"]
    r.lines.append(f"`{s['config']}` ({m['parameters']:,} parameters{', ' + ' '.join(s['overrides']) if s['overrides'] else ''}), "
                   f"batch {s['batch']} x {s['seq_len']}, bf16 autocast, AdamW as `gptlab run` trains; median of "
                   f"{s['steps']} steps after {s['warmup']} warm-up (gptlab.bench.model.bench_model, compile=True). "
                   f"Peak for MFU: {fmt(m['peak_flops'], '{:.3g}')} FLOP/s. Rerun: `{res['command']}`")
    rows = [[t["mode"], t["status"], fmt(t["step_ms"], "{:,.2f}"), fmt(t["tokens_per_s"], "{:,.0f}"),
             fmt(t["tflops"], "{:.2f}"), fmt(None if t["mfu"] is None else 100 * t["mfu"], "{:.1f}%"),
             mib(t["peak_mem_bytes"]), mib(t["est_mem_bytes"]), fmt(t["compile_s"], "{:.1f}")] for t in res["train"]]
    r.lines += table(["mode", "status", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak mem", "estimate",
                      "compile s"], rows)
    comp = next((t for t in res["train"] if t["mode"] == "compiled"), None)
    ok = (not res["failed"] and comp is not None and comp["status"] == "ok"
          and comp["tokens_per_s"] is not None and comp["tokens_per_s"] > 0)
    r.status = "PASS" if ok else "FAIL"
    if comp is not None:
        r.figures.update(tokens_per_s=comp["tokens_per_s"], mfu=comp["mfu"], config=s["config"])
    r.summary = (f"{s['config']} compiled: {fmt(comp and comp['tokens_per_s'], '{:,.0f}')} tokens/s, MFU "
                 f"{fmt(None if not comp or comp['mfu'] is None else 100 * comp['mfu'], '{:.1f}%')}"
                 + ("" if ok else f"; {comp['status'] if comp else 'no compiled row'}"))


def check_attention(r: Result, device: torch.device, s: dict, threads: Optional[int]) -> None:
    from gptlab.bench.attention import bench_attention

    res = bench_attention(attention=["vanilla", "sdpa"], seq_lens=s["seq_lens"], batch=s["batch"], heads=s["heads"],
                          head_dim=s["head_dim"], kernels=["default"], repeats=s["repeats"], warmup=s["warmup"],
                          device=str(device), dtype="bf16", threads=threads)
    r.lines.append(f"One causal attention module, batch {s['batch']}, {s['heads']} heads x {s['head_dim']}, bf16 "
                   f"autocast, forward+backward, median of {s['repeats']} calls; peak memory is what the call "
                   f"allocated above what was resident (CUDA only). Rerun: `{res['command']}`")
    by = {(row["attention"], row["seq_len"]): row for row in res["rows"]}
    rows, ratios, ok = [], {}, not res["failed"]
    for T in s["seq_lens"]:
        v, q = by.get(("vanilla", T)), by.get(("sdpa", T))
        if not v or not q or v["status"] != "ok" or q["status"] != "ok":
            ok = False
            rows.append([T, "–", "–", "–", "–", "–", "–", "failed: " + "; ".join(
                f"{row['attention']} {row['status']} {row['error'] or ''}" for row in (v, q) if row)])
            continue
        speed = v["fwd_bwd_ms"] / q["fwd_bwd_ms"]
        mem = (v["peak_mem_bytes"] / q["peak_mem_bytes"]) if v["peak_mem_bytes"] and q["peak_mem_bytes"] else None
        if device.type == "cuda" and mem is None:
            ok = False  # CUDA always has a peak-memory counter: a missing figure is a bug
        ratios[T] = (speed, mem)
        rows.append([T, fmt(v["fwd_bwd_ms"], "{:,.2f}"), fmt(q["fwd_bwd_ms"], "{:,.2f}"), fmt(speed, "{:.2f}x"),
                     mib(v["peak_mem_bytes"]), mib(q["peak_mem_bytes"]), fmt(mem, "{:.2f}x"), q["kernel_used"]])
    r.lines += table(["T", "vanilla ms", "sdpa ms", "vanilla / sdpa time", "vanilla mem", "sdpa mem",
                      "vanilla / sdpa mem", "sdpa kernel"], rows)
    r.figures["ratios"] = ratios
    r.status = "PASS" if ok else "FAIL"
    last = max(ratios) if ratios else None
    r.summary = ("both ran at T=" + ",".join(map(str, s["seq_lens"])) +
                 (f"; at T={last}: sdpa {ratios[last][0]:.2f}x faster, memory "
                  f"{fmt(ratios[last][1], '{:.2f}x less')}" if last else "")) if ok else "a row failed"


def check_reference(r: Result, device: torch.device, s: list, threads: Optional[int], compiled: bool) -> None:
    import vs_reference

    argv = [*s, "--device", str(device), "--dtype", "bf16", "--models", "gptlab,hf", "--json"]
    argv += ["--compile"] if compiled else []
    argv += ["--threads", str(threads)] if threads else []
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = vs_reference.main(argv)
    except SystemExit as exc:  # its errors exit with a message
        rc = exc.code
    try:
        res = json.loads(out.getvalue())
    except ValueError:
        r.status, r.summary = "FAIL", f"vs_reference.py gave no JSON (exit {rc})"
        r.lines.append(f"`vs_reference.main({argv})` exited with {rc!r}; its output: "
                       f"{out.getvalue()[-400:]!r}")
        return
    c = next(c for c in res["comparisons"] if c["reference"] == "hf")
    diff = res["max_abs_logit_diff_vs_gptlab"].get("hf")
    r.lines.append(f"benchmarks/vs_reference.py, gptlab and Hugging Face GPT-2 with the same weights, alternating "
                   f"rounds (transformers {res['env'].get('transformers')}). Rerun: `{res['command']}`")
    r.lines += table(["model", "tokens/s (median of rounds)", "per round", "step peak mem"],
                     [[name, fmt(m["tokens_per_s"], "{:,.0f}"), " ".join(f"{v:,.0f}" for v in m["rounds"]),
                       mib(m["peak_mem_bytes"])] for name, m in res["models"].items()])
    r.lines.append("")
    r.lines.append(f"gptlab / HF = **{c['ratio']:.3f}x** (median of per-round ratios; spread {c['spread']:.3f}, "
                   f"{'within noise' if c['within_noise'] else 'outside noise'}); same-weights max |logits diff| "
                   f"{fmt(diff, '{:.1e}')} (fp32, CPU).")
    if res["compile_errors"]:
        r.lines.append(f"compile errors: {res['compile_errors']}")
    ok = not res["compile_errors"] and diff is not None and diff <= LOGITS_TOL and math.isfinite(c["ratio"])
    r.figures.update(ratio=c["ratio"], spread=c["spread"], meets=c["meets_target"])
    r.status = "PASS" if ok else "FAIL"
    r.summary = f"gptlab / HF {c['ratio']:.3f}x (spread {c['spread']:.3f}), logits diff {fmt(diff, '{:.1e}')}"


def ddp_experiment(s: dict) -> str:
    """The tiny experiment the torchrun check trains (nano preset, the bundled corpus, one seed)."""
    return (f"name: gpu_check_ddp\n"
            f"model: {{preset: nano}}\n"
            f"data: {{dataset: python_docs, tokenizer: bytes}}\n"
            f"train: {{steps: {s['steps']}, batch_size: {s['batch_size']}, eval_every: {s['steps']}, "
            f"eval_batches: 1, log_every: {s['steps']}}}\n"
            f"seeds: [0]\n")


def check_ddp(r: Result, device: torch.device, s: dict, threads: Optional[int]) -> None:
    dev = "cuda" if device.type == "cuda" else "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "gptlab", "run", "TINY.yaml", "--device", dev]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    shown = "python " + " ".join(shlex.quote(w) for w in cmd[1:])
    r.lines.append(f"In an empty folder, with TINY.yaml = nano preset, {s['steps']} steps of batch "
                   f"{s['batch_size']}, one seed: `{shown}` (gptlab picks NCCL on CUDA, gloo on CPU). "
                   f"Contract: it exits 0 and the run's summary.json has \"status\": \"completed\" and "
                   f"\"world_size\": 1.")
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        Path(tmp, "TINY.yaml").write_text(ddp_experiment(s))
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=s["timeout"])
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = None, f"timed out after {s['timeout']} s\n{exc.stdout or ''}{exc.stderr or ''}"
        summaries = sorted(Path(tmp, "results").glob("*/*/summary.json"))
        summary = json.loads(summaries[0].read_text()) if summaries else {}
    keys = {k: summary[k] for k in sorted(summary) if k in ("status", "world_size") or "backend" in k}
    r.lines += table(["exit status", "summary.json", *keys], [[rc, "found" if summary else "missing",
                                                              *keys.values()]])
    r.figures.update(rc=rc, **keys)
    if rc != 0 or summary.get("status") != "completed":
        r.status = "FAIL"
        r.summary = f"torchrun exited {rc}, run status {summary.get('status', 'missing')}"
        tail = "\n".join(log.strip().splitlines()[-15:])
        r.lines += ["", "Last lines of its output:", "", "```", tail, "```"]
    elif "world_size" not in summary:
        r.status = "N/A"
        r.summary = ("not available in this gptlab: the run completed under torchrun but summary.json has no "
                     "world_size")
    elif summary["world_size"] == 1:
        r.status = "PASS"
        r.summary = "completed under torchrun, world_size 1" + \
            "".join(f", {k} {v}" for k, v in keys.items() if "backend" in k)
    else:
        r.status = "FAIL"
        r.summary = f"summary.json says world_size {summary['world_size']!r}, expected 1"


# ----------------------------------------------------------------------------------------------
# targets and the report
# ----------------------------------------------------------------------------------------------
def evaluate_targets(results: dict, on_gpu: bool, device_name: str) -> list[list[str]]:
    """Rows of target, figure, verdict ('met', 'not met' or 'n/a (why)'), from the checks' figures."""
    rows = []
    results = {name: results.get(name, Result(name)) for name in CHECKS}  # a check not run yet has no figures
    mfu = results["model throughput"].figures.get("mfu")
    hopper = "H100" in device_name or "H200" in device_name
    label = f"GPT-2 124M MFU >= {MFU_TARGET:.0%} (aim {MFU_AIM:.0%}) on an H100/H200"
    if mfu is None:
        why = "no GPU" if not on_gpu else "MFU unknown (no peak FLOP/s for this device)"
        rows.append([label, "n/a", f"n/a ({why})"])
    else:
        verdict = ("met" if mfu >= MFU_TARGET else "not met") + (f", aim {'met' if mfu >= MFU_AIM else 'not met'}")
        rows.append([label, f"{100 * mfu:.1f}%", verdict + ("" if hopper else " (stated for an H100/H200)")])
    speed, mem = results["attention vanilla vs sdpa"].figures.get("ratios", {}).get(TARGET_SEQ_LEN, (None, None))
    for label, value, goal in ((f"sdpa >= {SDPA_SPEEDUP_TARGET:g}x faster than vanilla at T={TARGET_SEQ_LEN}",
                                speed, SDPA_SPEEDUP_TARGET),
                               (f"sdpa >= {SDPA_MEMORY_TARGET:g}x less attention memory than vanilla at "
                                f"T={TARGET_SEQ_LEN}", mem, SDPA_MEMORY_TARGET)):
        if value is None:
            why = "no GPU: T=2048 not run, no peak-memory counter" if not on_gpu else "not measured"
            rows.append([label, "n/a", f"n/a ({why})"])
        else:
            rows.append([label, f"{value:.2f}x", "met" if value >= goal else "not met"])
    ref = results["vs Hugging Face"].figures
    label = f"gptlab >= {HF_TARGET:g}x Hugging Face GPT-2 (or within noise)"
    if "ratio" not in ref:
        rows.append([label, "n/a", "n/a (not measured)"])
    else:
        where = "" if on_gpu else " (tiny CPU model)"
        rows.append([label, f"{ref['ratio']:.3f}x (spread {ref['spread']:.3f})",
                     ("met" if ref["meets"] else "not met") + where])
    return rows


def write_report(path: Path, results: dict, env: dict, on_gpu: bool, gpu_present: bool, wall: float,
                 command: str) -> None:
    lines = ["# gptlab GPU path check", ""]
    if not gpu_present:
        lines += ["> **No GPU was found** (torch.cuda.is_available() is False). Every check ran on the CPU at "
                  "tiny sizes: check 1 compares CPU fp32 with CPU float64, check 4 reports the SDPA kernel "
                  "without requiring flash, the DDP run uses gloo. No GPU figure was measured and the "
                  "GPU targets below are n/a.", ""]
    elif not on_gpu:
        lines += ["> A GPU is present but this run used the CPU (--device cpu): tiny sizes, no GPU figures.", ""]
    passed = sum(r.status == "PASS" for r in results.values())
    lines += [f"- device: {env['device']}",
              f"- torch {env['torch']} (CUDA {env['cuda'] or 'none'}, cuDNN {env.get('cudnn') or 'none'}), "
              f"gptlab {env['gptlab']}, Python {env['python']}, transformers {env.get('transformers', 'n/a')}",
              f"- CPU threads: {env['cpu_threads']}; load average at the start: {env.get('load_avg')}",
              f"- command: `{command}`",
              f"- {'finished' if len(results) == len(CHECKS) else 'in progress'} "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}, wall time {wall:.0f} s",
              f"- overall: **{'PASS' if passed == len(CHECKS) else 'FAIL'}** "
              f"({passed}/{len(CHECKS)} checks passed"
              + (f"; {len(CHECKS) - len(results)} not run yet: {', '.join(CHECKS[len(results):])}"
                 if len(results) < len(CHECKS) else "") + ")", "", "## Checks", ""]
    lines += table(["#", "check", "result", "figures", "s"],
                   [[i, r.name, r.status, r.summary, f"{r.seconds:.1f}"] for i, r in enumerate(results.values(), 1)])
    lines += ["", "## Targets", "", "Reported, not part of the exit status.", ""]
    lines += table(["target", "figure", "status"], evaluate_targets(results, on_gpu, env["device"]))
    for i, r in enumerate(results.values(), 1):
        lines += ["", f"## {i}. {r.name}: {r.status}", ""]
        for line in r.lines:  # a paragraph and the table after it need a blank line between them
            if line.startswith("|") and lines[-1] and not lines[-1].startswith("|"):
                lines.append("")
            lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--report", type=Path, default=Path("gpu_check.md"), help="Markdown report (default: gpu_check.md)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda, cuda:N or cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, for steady timings on shared cores; torch's own "
                        "choice with a GPU)")
    p.add_argument("--only", default=None, metavar="N[,N]",
                   help="run only these checks (numbers 1-8, e.g. 4,5); the others are reported as not run")
    p.add_argument("--compile-reference", action="store_true",
                   help="torch.compile both models in check 7 too (adds two compiles of GPT-2 on a GPU)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.only is not None:
        try:
            args.only = sorted({int(n) for n in args.only.split(",")})
        except ValueError:
            p.error(f"--only takes check numbers 1-{len(CHECKS)} separated by commas, got {args.only!r}")
        if not args.only or not all(1 <= n <= len(CHECKS) for n in args.only):
            p.error(f"--only takes check numbers 1-{len(CHECKS)}, got {args.only}")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    from gptlab.bench.timing import environment
    from gptlab.train.devices import resolve_device
    from gptlab.errors import ConfigError

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = resolve_device(name)
    except ConfigError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print("gpu_check: error: --device must be cuda or cpu", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)  # resolve_device gives CUDA devices their index
    threads = args.threads if args.threads is not None else (None if on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    sizes = SIZES["gpu" if on_gpu else "cpu"]
    env = environment(device, "bf16")
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = "not installed"
    words = ["python", *(sys.argv if argv is None else [os.path.relpath(__file__), *argv])]
    command = " ".join(shlex.quote(str(w)) for w in words)
    print(f"gptlab GPU path check on {env['device']} (torch {env['torch']})"
          + ("" if torch.cuda.is_available() else ": no GPU found, tiny CPU sizes"), flush=True)

    steps: list[tuple[str, Callable[[Result], None]]] = [
        ("logits", lambda r: check_logits(r, device, sizes["logits"])),
        ("bf16 training", lambda r: check_training(r, device, sizes["train"])),
        ("torch.compile", lambda r: check_compile(r, device, sizes["compile"])),
        ("SDPA kernel", lambda r: check_kernels(r, device, sizes["kernel"])),
        ("model throughput", lambda r: check_model(r, device, sizes["model"], threads)),
        ("attention vanilla vs sdpa", lambda r: check_attention(r, device, sizes["attention"], threads)),
        ("vs Hugging Face", lambda r: check_reference(r, device, sizes["reference"], threads, args.compile_reference)),
        ("DDP torchrun", lambda r: check_ddp(r, device, sizes["ddp"], threads)),
    ]
    assert tuple(n for n, _ in steps) == CHECKS
    results: dict[str, Result] = {}
    for i, (check_name, run) in enumerate(steps, 1):
        if args.only and i not in args.only:
            results[check_name] = Result(check_name, status="N/A", summary="not run (--only)")
            continue
        r = results[check_name] = Result(check_name)
        t0 = time.perf_counter()
        try:
            run(r)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            r.status = "FAIL"
            r.summary = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            r.lines += ["", "```", traceback.format_exc().strip(), "```"]
        finally:
            if threads:  # a benchmark may have changed it
                torch.set_num_threads(threads)
            release(device)
        r.seconds = time.perf_counter() - t0
        print(f"[{i}/{len(steps)}] {check_name}: {r.status} ({r.seconds:.1f} s) {r.summary}", flush=True)
        # after every check, so a time-out or a crash of the process keeps what was measured
        write_report(args.report, results, env, on_gpu, torch.cuda.is_available(), time.perf_counter() - _START,
                     command)
    wall = time.perf_counter() - _START
    ok = all(r.status == "PASS" for r in results.values())
    print(f"{'all checks passed' if ok else 'some checks did not pass'} in {wall:.0f} s; report: {args.report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
