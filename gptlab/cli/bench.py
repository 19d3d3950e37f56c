"""``gptlab bench attention`` and ``gptlab bench model``: the options and the tables.

The measuring lives in ``gptlab.bench``; this module turns flags into its keyword arguments and
its report into tables or JSON. torch loads only inside the handlers, so ``gptlab --help`` stays
instant.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..bench import DTYPES, FORCEABLE_KERNELS
from ..fmt import nbytes, num, yaml_value


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


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``, described as ``what`` in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser("bench", parents=[common],
                       help="time attention implementations and models (training, generation)",
                       description="Benchmarks that print the device, dtype, torch version, the settings "
                                   "and a command that reruns them; --json for machine-readable output.")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True

    a = bsub.add_parser("attention", parents=[common],
                        help="forward+backward time and peak memory of each attention implementation",
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
                        + ",".join(FORCEABLE_KERNELS) + " (default: all of them on CUDA, 'default' elsewhere); "
                        "a kernel that cannot run is reported as unsupported")
    _shared_options(a, repeats=True)
    a.set_defaults(handler=cmd_bench_attention)

    m = bsub.add_parser("model", parents=[common],
                        help="training tokens/s, TFLOP/s, MFU, memory; generation with/without KV cache",
                        description="Time training steps (the optimizer, clipping, as `gptlab run` trains) and "
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
    m.add_argument("--optimizer", default="adamw", metavar="NAME_OR_MAPPING",
                   help="the optimizer each timed step uses: a registered name (adamw, muon, lion, sgd) or "
                        "'{name: muon, ns_steps: 5}' (default: adamw)")
    _shared_options(m, repeats=False)
    m.set_defaults(handler=cmd_bench_model)


def _shared_options(p: argparse.ArgumentParser, repeats: bool) -> None:
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


def _settings(args: argparse.Namespace) -> dict:
    """The keyword arguments both benchmarks take, from their shared options."""
    return dict(warmup=args.warmup, device=args.device, dtype=args.dtype, plugins_dir=args.plugins_dir,
                threads=args.threads)


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from ..bench.attention import bench_attention

    result = bench_attention(attention=args.attention, position=args.position, seq_lens=args.seq_lens,
                             batch=args.batch, heads=args.heads, head_dim=args.head_dim, kernels=args.kernels,
                             repeats=args.repeats, **_settings(args))
    return _emit(result, args.json, _print_attention)


def cmd_bench_model(args: argparse.Namespace) -> int:
    from ..bench.model import bench_model

    result = bench_model(args.config, args.overrides, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                         compile=args.compile, gen_tokens=args.gen_tokens, prompt_len=args.prompt_len,
                         gen_batch=args.gen_batch, gen_repeats=args.gen_repeats, seed=args.seed,
                         optimizer=args.optimizer, **_settings(args))
    return _emit(result, args.json, _print_model)


def _emit(result: dict, as_json: bool, printer: Callable[[dict], None]) -> int:
    """Print the report; exit status 1 when a row failed (unsupported kernels and the like do not count)."""
    if as_json:
        result["command"] += " --json"  # the rerun command reproduces the output format too
        print(json.dumps(result, indent=2, default=str))
    else:
        printer(result)
    return 1 if result.get("failed") else 0


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # piped to a file: do not squeeze the tables into 80 columns
        console = Console(highlight=False, width=160)
    return console


def _print_header(console, title: str, result: dict) -> None:
    env = result["env"]
    load = env.get("load_avg")
    console.print(f"[bold]{title}[/]")
    console.print(f"device: {env['device']}  dtype: {env['dtype']}  torch {env['torch']}"
                  f"{'  cuda ' + env['cuda'] if env.get('cuda') else ''}  gptlab {env['gptlab']}  "
                  f"python {env['python']}" + (f"  load avg {load[0]:.2f}" if load else ""), soft_wrap=True)
    console.print("settings: " + ", ".join(f"{k}={yaml_value(v)}" for k, v in result["settings"].items()),
                  soft_wrap=True)
    console.print(f"rerun: {result['command']}", soft_wrap=True)


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
                      num(r["fwd_bwd_ms"], "{:,.2f}") if ok else r["status"], nbytes(r["peak_mem_bytes"]),
                      num(r["time_vs_base"], "{:.2f}x"), num(r["mem_vs_base"], "{:.2f}x"))
    console.print(table)
    if result["env"]["device_type"] != "cuda":
        console.print("peak memory is measured on CUDA only (n/a here); SDPA kernels are forced on CUDA only "
                      "unless --kernels is given")


def _print_model(result: dict) -> None:
    from rich.table import Table

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
            table.add_row(r["mode"], r["status"], "", "", "", "", nbytes(r["est_mem_bytes"]), "")
            continue
        table.add_row(r["mode"], num(r["step_ms"], "{:,.2f}"), num(r["tokens_per_s"], "{:,.0f}"),
                      num(r["tflops"], "{:,.3f}"), num(r["mfu"], "{:.1%}"), nbytes(r["peak_mem_bytes"]),
                      nbytes(r["est_mem_bytes"]), num(r["compile_s"], "{:.1f}"))
    console.print(table)
    if result["generate"]:
        console.print(f"generation: {s['gen_batch']} x ({s['prompt_len']}-token prompt + {s['gen_tokens']} new "
                      f"tokens), greedy, median of {s['gen_repeats']} calls")
        g = Table(title="generation")
        for col in ("mode", "tokens/s", "ms/token", "same tokens"):
            g.add_column(col, justify="left" if col == "mode" else "right")
        for r in result["generate"]:
            same = r["same_tokens_as_cache"]
            g.add_row(r["mode"], num(r["tokens_per_s"], "{:,.1f}") if r["status"] == "ok" else r["status"],
                      num(r["ms_per_token"], "{:,.2f}"), "n/a" if same is None else ("yes" if same else "no"))
        console.print(g)
    if info["peak_flops"] is None:
        console.print("MFU needs a known GPU peak (n/a here); peak memory is measured on CUDA only")
    else:
        console.print(f"MFU against the dense bf16 peak {info['peak_flops'] / 1e12:,.0f} TFLOP/s")
