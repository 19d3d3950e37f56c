"""torch.compile across built-in component combinations: does it compile, match eager, break the graph?

For each combination of registered components (a tiny model: vocab 64, context 32, width 32,
4 heads, 2 layers, dropout 0) this builds the model twice with the same weights, and

  1. runs one forward+backward (cross-entropy on a fixed batch) eagerly and through
     ``torch.compile(model, backend=--backend)``, and compares the logits and every parameter's
     gradient (max absolute difference, must be <= --atol, 1e-4 by default in fp32);
  2. counts graph breaks (``torch._dynamo.utils.counters['graph_break']``, one per break, with
     its reason), the graphs captured, frames dynamo gave up on and ran eagerly (e.g. the
     recompile limit) and the guards whose failure caused a recompile; a second training step
     must not recompile; a break is a failure unless --allow-graph-breaks;
  3. checks compiled cached decoding: in eval mode (no_grad), a prefill of the prompt, then
     ``--decode-tokens`` (8) new tokens one at a time with ``cache=model.new_cache(...)``,
     against the eager model's uncached logits of the same tokens. Expected: 3 graphs (prefill,
     first step, then one step graph with a dynamic offset); one graph per token means every
     token recompiles, and past ``torch._dynamo.config.recompile_limit`` (8) dynamo silently
     runs the model eagerly: that is reported as "fell back to eager" and fails.

The compiled copy is built fresh (nothing cached by an eager call), as in ``gptlab run
train.compile=true``, whose ``compile_or_fallback`` probes exactly this first call.
``torch._dynamo.reset()`` runs between combinations, so each one compiles from scratch (the
inductor on-disk FX-graph cache, if enabled, still applies; the header says whether it is).

Default: every attention x position, other components at their defaults. ``--all``: the full
attention x position x norm x norm_placement x activation product. Any kind can be narrowed or
widened with a comma list (``--position rope,alibi``; ``all`` = every registered name).

    python benchmarks/compile_matrix.py                              # 10 combos, inductor, CPU
    python benchmarks/compile_matrix.py --all --backend aot_eager    # full product, fast check
    python benchmarks/compile_matrix.py --device cuda                # inductor + triton on a GPU

Exit status 0 when every combination passes, 1 otherwise (2 for bad options).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shlex
import sys
import time
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

from gptlab import GPTModel
from gptlab.bench.timing import environment
from gptlab.plugin.hookspecs import MODEL_KINDS as COMPONENT_KINDS
from gptlab.train.devices import resolve_device, synchronize
from gptlab.errors import ConfigError, IncompatibleComponents, did_you_mean
from gptlab.plugin.manager import default_plugins

TINY = {"vocab_size": 64, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}
DEFAULT_WIDE = ("attention", "position")  # kinds that span all names when not --all


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for kind in COMPONENT_KINDS:
        p.add_argument(f"--{kind.replace('_', '-')}", dest=kind, metavar="NAMES",
                       help=f"comma list of {kind} names, or 'all' (default: "
                            f"{'all' if kind in DEFAULT_WIDE else 'the config default'}; --all: all)")
    p.add_argument("--all", action="store_true", help="every registered name of every kind not given explicitly")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager, ...)")
    p.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead, max-autotune)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: context, 32)")
    p.add_argument("--prompt-len", type=int, default=8, help="prefill length of the decoding check (default 8)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="tokens decoded one at a time after the prefill (default 8: past the first, dynamo "
                        "should settle on a dynamic-offset graph; a recompile per token hits its limit)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |compiled - eager| allowed (default 1e-4)")
    p.add_argument("--allow-graph-breaks", action="store_true", help="do not count a graph break as a failure")
    p.add_argument("--no-decode", action="store_true", help="skip the cached-decoding check")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", metavar="PATH", help="also write the JSON object to PATH")
    return p.parse_args(argv)


def combinations(args: argparse.Namespace, registry) -> list[dict]:
    chosen = {}
    for kind in COMPONENT_KINDS:
        names = registry.names(kind)
        text = getattr(args, kind)
        if text is None:
            text = "all" if (args.all or kind in DEFAULT_WIDE) else None
        if text is None:
            chosen[kind] = [None]  # the ModelConfig default
            continue
        picked = names if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
        for n in picked:
            if n not in names:
                raise ConfigError(f"--{kind.replace('_', '-')}: unknown {kind} '{n}'{did_you_mean(n, names)}; "
                                  f"registered: {', '.join(names)}")
        chosen[kind] = picked
    combos = []
    for values in itertools.product(*(chosen[k] for k in COMPONENT_KINDS)):
        combos.append({k: v for k, v in zip(COMPONENT_KINDS, values) if v is not None})
    return combos


def label(combo: dict, varied: list) -> str:
    return " ".join(combo[k] for k in varied if k in combo) or "defaults"


def first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def short_reason(reason: str, limit: int = 300) -> str:
    """A dynamo break reason on one line: its title plus the 'Explanation:' line when there is one."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    if not lines:
        return "(no reason given)"
    text = lines[0] + "".join(f" — {ln}" for ln in lines[1:] if ln.startswith("Explanation:"))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _counters() -> dict:
    """What dynamo recorded since the last clear: graph breaks, graphs, frames it gave up on, recompile causes."""
    from torch._dynamo.utils import counters, guard_failures

    breaks = dict(counters["graph_break"])
    # 'unimplemented' also lists every graph break; what is left are frames dynamo gave up on
    # entirely and ran eagerly (e.g. "Dynamo recompile limit exceeded")
    gave_up = {k: v for k, v in counters["unimplemented"].items() if k not in breaks}
    causes: dict[str, list] = {}  # guard's source (or text) -> [first example, count]
    for reasons in guard_failures.values():
        for reason in reasons:
            for part in reason.split("\n")[0].split("; "):
                part = part.split(": ", 1)[-1] if part[:1].isdigit() else part  # drop the "0/3: " compile id
                part = " ".join(part.split())
                group = part.split(" # ", 1)[1] if " # " in part else part
                causes.setdefault(group, [part, 0])[1] += 1
    return {"graph_breaks": int(sum(breaks.values())), "break_reasons": sorted(breaks, key=breaks.get, reverse=True),
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "fell_back": sorted(gave_up, key=gave_up.get, reverse=True),
            "recompile_causes": [f"{ex} (x{n})" if n > 1 else ex
                                 for ex, n in sorted(causes.values(), key=lambda e: -e[1])],
            "fx_cache_hits": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
            "fx_cache_misses": int(counters["inductor"].get("fxgraph_cache_miss", 0))}


def _clear_counters() -> None:
    from torch._dynamo.utils import counters, guard_failures

    counters.clear()
    guard_failures.clear()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def fwd_bwd(model, x, y):
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    return logits.detach()


def check_one(combo: dict, args, device: torch.device, x, y, prompt, nxt) -> dict:
    row: dict[str, Any] = {"components": combo, "ok": False, "compiled": False, "max_dlogits": None,
                           "max_dgrad": None, "graph_breaks": None, "graphs": None, "break_reasons": [],
                           "fell_back": [], "recompile_causes": [], "step2_recompiled": None, "compile_s": None,
                           "decode": None, "decode_max_dlogits": None, "decode_graph_breaks": None,
                           "decode_graphs": None, "decode_break_reasons": [], "decode_fell_back": [],
                           "decode_recompile_causes": [], "error": None}
    problems: list[str] = []
    notes: list[str] = []
    torch._dynamo.reset()
    _clear_counters()
    try:
        torch.manual_seed(args.seed)
        eager = GPTModel({**TINY, **combo}).to(device)
    except IncompatibleComponents as exc:
        row.update(ok=True, skipped=True, error=f"skipped (incompatible): {first_line(exc)}")
        return row
    fresh = copy.deepcopy(eager)  # same weights, and nothing cached yet by a forward pass
    eager.train()
    fresh.train()

    ref_logits = fwd_bwd(eager, x, y)
    ref_grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}

    # 1. compiled training step (the first call compiles), then a second one that must not recompile
    try:
        compiled = torch.compile(fresh, backend=args.backend, mode=args.mode)
        synchronize(device)
        t0 = time.perf_counter()
        logits = fwd_bwd(compiled, x, y)
        synchronize(device)
        row["compile_s"] = time.perf_counter() - t0
        row["compiled"] = True
        row.update(_counters())
        grads = {n: p.grad.clone() for n, p in fresh.named_parameters() if p.grad is not None}
        fresh.zero_grad(set_to_none=True)
        fwd_bwd(compiled, x, y)
    except Exception as exc:  # noqa: BLE001 - dynamo/inductor errors come in many types
        row["error"] = first_line(exc)
        row.update(_counters())
        return row
    after = _counters()
    row["step2_recompiled"] = after["graphs"] > row["graphs"]
    row.update({k: after[k] for k in ("graph_breaks", "break_reasons", "fell_back", "recompile_causes")})
    row["max_dlogits"] = _max_diff(logits, ref_logits)
    missing = sorted(set(ref_grads) ^ set(grads))
    if missing:
        problems.append(f"gradients present in only one model: {', '.join(missing)}")
    row["max_dgrad"] = max((_max_diff(grads[n], ref_grads[n]) for n in ref_grads if n in grads), default=0.0)
    if row["max_dlogits"] > args.atol or row["max_dgrad"] > args.atol:
        problems.append(f"compiled differs from eager by more than atol {args.atol:g}")
    if row["fell_back"]:
        problems.append(f"train: dynamo fell back to eager ({row['fell_back'][0].splitlines()[0].strip()}); "
                        f"recompiled on: " + (row["recompile_causes"] or ["?"])[0][:240])
    if row["graph_breaks"] and not args.allow_graph_breaks:
        problems.append("train: graph break: " + short_reason(row["break_reasons"][0], 200))
    if row["step2_recompiled"]:  # one extra compile, then steady: worth knowing, not a failure
        notes.append("train: the second step recompiled (once): " + (row["recompile_causes"] or ["?"])[0][:200])

    # 2. compiled cached decoding (prefill, then one token at a time), same compiled module, eval mode
    if not args.no_decode:
        _clear_counters()
        eager.eval()
        compiled.eval()
        try:
            with torch.no_grad():
                want = eager(torch.cat([prompt, nxt], dim=1))
                cache = fresh.new_cache(prompt.shape[1] + nxt.shape[1])
                outs = [compiled(prompt, cache=cache)]
                for j in range(nxt.shape[1]):
                    outs.append(compiled(nxt[:, j:j + 1], cache=cache))
            got = torch.cat(outs, dim=1)
            d = row["decode_max_dlogits"] = _max_diff(got, want)
            c = _counters()
            row.update({f"decode_{k}": c[k] for k in ("graph_breaks", "graphs", "break_reasons", "fell_back",
                                                       "recompile_causes", "fx_cache_hits", "fx_cache_misses")})
            if d > args.atol:
                row["decode"] = "mismatch"
                problems.append(f"decode: cached compiled logits differ from eager by more than atol {args.atol:g}")
            elif c["fell_back"]:
                row["decode"] = "fell back to eager"
                problems.append(f"decode: dynamo fell back to eager ({c['fell_back'][0].splitlines()[0].strip()}); "
                                f"recompiled on: " + (c["recompile_causes"] or ["?"])[0][:240])
            elif c["graph_breaks"] and not args.allow_graph_breaks:
                row["decode"] = "graph breaks"
                problems.append("decode: graph break: " + short_reason(c["break_reasons"][0], 200))
            else:
                row["decode"] = "ok"
        except Exception as exc:  # noqa: BLE001
            row["decode"] = "failed"
            c = _counters()
            row.update(decode_graph_breaks=c["graph_breaks"], decode_break_reasons=c["break_reasons"],
                       decode_fell_back=c["fell_back"], decode_recompile_causes=c["recompile_causes"])
            problems.append(f"decode: {first_line(exc)}")
    row["ok"] = not problems
    row["problems"], row["notes"] = problems, notes
    row["error"] = problems[0] if problems else (f"note: {notes[0]}" if notes else None)
    return row


def command_line() -> str:
    """The command as typed from the repository root, with the thread variable when it is set."""
    script = os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else sys.argv[0]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return " ".join([*env, "python", shlex.quote(script), *(shlex.quote(w) for w in sys.argv[1:])])


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        combos = combinations(args, default_plugins().registry)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    varied = [k for k in COMPONENT_KINDS if len({c.get(k) for c in combos}) > 1] or list(COMPONENT_KINDS[:2])
    seq_len = args.seq_len or TINY["context_length"]
    g = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, TINY["vocab_size"], (args.batch, seq_len + 1), generator=g)
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    prompt = data[:, :args.prompt_len].to(device)
    nxt = data[:, args.prompt_len:args.prompt_len + args.decode_tokens].to(device)
    if args.prompt_len < 1 or args.decode_tokens < 1 or args.prompt_len + args.decode_tokens > seq_len + 1:
        print(f"error: need 1 <= --prompt-len, 1 <= --decode-tokens and their sum <= {seq_len + 1}", file=sys.stderr)
        return 2

    try:
        from torch._inductor import config as inductor_config

        fx_cache = bool(inductor_config.fx_graph_cache)
    except Exception:  # noqa: BLE001
        fx_cache = None
    fixed = {k: v for k, v in combos[0].items() if k not in varied} if combos else {}
    result: dict[str, Any] = {
        "env": {**environment(device, "fp32"), "backend": args.backend, "mode": args.mode,
                "inductor_fx_graph_cache": fx_cache},
        "settings": {"model": TINY, "batch": args.batch, "seq_len": seq_len, "prompt_len": args.prompt_len,
                     "decode_tokens": args.decode_tokens,
                     "atol": args.atol, "varied": varied, "fixed": fixed or "config defaults",
                     "allow_graph_breaks": args.allow_graph_breaks},
        "command": command_line(), "rows": []}

    console = None
    if not args.json:
        from rich.console import Console

        console = Console(highlight=False, markup=False)  # no markup: error texts hold [brackets]
        if not console.is_terminal:
            console = Console(highlight=False, markup=False, width=200)
        env = result["env"]
        console.print("torch.compile across combinations", style="bold")
        console.print(f"device: {env['device']}  torch {env['torch']}"
                      f"{'  cuda ' + env['cuda'] if env.get('cuda') else ''}  backend: {args.backend}"
                      f"{'  mode: ' + args.mode if args.mode else ''}  fx graph cache: {fx_cache}  "
                      f"python {env['python']}  load avg {env['load_avg'][0] if env['load_avg'] else 'n/a'}",
                      soft_wrap=True)
        console.print(f"model: {TINY}, batch {args.batch} x {seq_len}, fp32, atol {args.atol:g}; "
                      f"fixed: {fixed or 'config defaults'}", soft_wrap=True)
        console.print(f"command: {result['command']}", soft_wrap=True)

    t_all = time.perf_counter()
    for i, combo in enumerate(combos, 1):
        row = check_one(combo, args, device, x, y, prompt, nxt)
        row["label"] = label(combo, varied)
        result["rows"].append(row)
        if console is not None:
            status = "ok" if row["ok"] else "FAIL"
            took = "" if row["compile_s"] is None else f" (first fwd+bwd {row['compile_s']:.1f} s)"
            console.print(f"  [{i}/{len(combos)}] {row['label']}: {status}{took}", soft_wrap=True)
    torch._dynamo.reset()
    result["total_s"] = time.perf_counter() - t_all
    n_fail = sum(not r["ok"] for r in result["rows"])
    result["passed"] = len(result["rows"]) - n_fail
    result["failed"] = n_fail
    try:
        result["env"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        pass

    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_table(console, result, args)
    return 0 if n_fail == 0 else 1


def _num(v: Optional[float], spec: str) -> str:
    return "–" if v is None else spec.format(v)


def compile_cell(r: dict) -> str:
    """Seconds of the first compiled fwd+bwd, plus inductor FX-graph cache hits/lookups when there were any."""
    text = _num(r["compile_s"], "{:.1f}")
    looked = (r.get("fx_cache_hits") or 0) + (r.get("fx_cache_misses") or 0)
    return f"{text} ({r['fx_cache_hits']}/{looked} cached)" if looked else text


def print_table(console, result: dict, args) -> None:
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("combination", "compiled ok?", "max |Δlogits|", "max |Δgrad|", "graph breaks", "graphs",
                "compile s", "cached decode", "pass", "error (first line) / note"):
        table.add_column(col, overflow="fold")
    for r in result["rows"]:
        if r.get("skipped"):
            compiled = "skipped"
        elif not r["compiled"]:
            compiled = "NO"
        elif r["fell_back"]:
            compiled = "fell back"
        else:
            compiled = "yes"
        decode = "–" if r["decode"] is None else (
            f"{r['decode']} (Δ {_num(r['decode_max_dlogits'], '{:.1e}')}, {_num(r['decode_graph_breaks'], '{}')} "
            f"breaks, {_num(r['decode_graphs'], '{}')} graphs)")
        table.add_row(r["label"], compiled, _num(r["max_dlogits"], "{:.1e}"), _num(r["max_dgrad"], "{:.1e}"),
                      _num(r["graph_breaks"], "{}"), _num(r["graphs"], "{}"), compile_cell(r), decode,
                      "yes" if r["ok"] else "FAIL", r["error"] or "")
    console.print(table)
    sections = (("graph break reasons", ("break_reasons", "decode_break_reasons"), short_reason),
                ("frames dynamo gave up on (ran eagerly)", ("fell_back", "decode_fell_back"), short_reason),
                ("recompiled because a guard failed on", ("recompile_causes", "decode_recompile_causes"),
                 lambda t: t[:300]))
    for title, keys, fmt in sections:
        seen: dict[str, list] = {}  # group key -> [example, count, labels]
        for r in result["rows"]:
            for key in keys:
                for reason in r.get(key) or []:
                    text = " ".join(fmt(reason).split())
                    # a guard with a source comment ("x == 3 # if ...: # file.py:12 in f") groups by its source
                    group = text.split(" # ", 1)[1] if " # " in text else text
                    phase = "decode" if key.startswith("decode") else "train"
                    entry = seen.setdefault(f"{phase}|{group}", [f"[{phase}] {text}", 0, set()])
                    entry[1] += 1
                    entry[2].add(r["label"])
        if seen:
            console.print(title, style="bold")
            for example, count, where in seen.values():
                where = sorted(where)
                names = ", ".join(where) if len(where) <= 8 else f"{', '.join(where[:4])}, … ({len(where)} in all)"
                console.print(f"  {example}{f'  (in {count} rows)' if count > 1 else ''}  <- {names}",
                              soft_wrap=True)
    console.print(f"{result['passed']}/{len(result['rows'])} passed, {result['failed']} failed "
                  f"in {result['total_s']:.0f} s (backend {args.backend})")


if __name__ == "__main__":
    sys.exit(main())
