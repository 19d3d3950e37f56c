"""gptlab side by side with references, in one process: training tokens/s, alternating rounds.

Four models of one architecture (GPT-2: pre-LN, LayerNorm, tanh-GELU MLP, learned positions,
causal SDPA attention with a fused qkv projection, qkv bias, tied head) with the same weights:

  gptlab   GPTModel built through the plugin registry (``GPTModel.from_hf_gpt2`` of the HF model)
  hf       Hugging Face transformers' GPT2LMHeadModel, attn_implementation='sdpa'
  nanogpt  nanoGPT's model.py GPT rewritten below (c_attn/c_proj, LayerNorm with bias, wte/wpe,
           the loss computed inside forward, the vocabulary padded to a multiple of 64 as nanoGPT
           pads 50257 to 50304), weights copied from gptlab (its padded rows are extra, unmasked
           classes, as in nanoGPT: they leave the real tokens' logits as they are)
  hand     the same GPT written out by hand below (plain modules), weights copied from gptlab

Each takes the same training step (autocast forward, float32 cross-entropy, backward, clipping
at 1.0, AdamW with gptlab's defaults, zero_grad) on the same batch; gptlab and nanogpt compute the
loss in their forward (``targets=``), hf and hand get ``F.cross_entropy`` after their logits.
After warm-up, every round runs ``--steps`` steps of each model one step at a time in turn
(A B C D A B C D ...; the order rotates every round), so drift in machine load hits every model
alike; each step is timed on its own (CUDA events or synchronize) and a model's round figure is
its tokens / its summed step time. Reported: median tokens/s per model over the rounds; for gptlab
against each reference the median of the per-round ratios (paired within a round, so load that
drifts between rounds cancels; the ratio of the two medians is printed too), and the spread: the
sample standard deviation of the per-round ratios. A ratio whose distance from 1 is below the
spread is "within noise". Target: gptlab >= 1.0x the reference (met when the ratio is >= 1 or
within noise).

CPU default (small):  python benchmarks/vs_reference.py --threads 1
GPU:                  python benchmarks/vs_reference.py --preset gpt2 --batch 16 --seq-len 1024 \
                          --device cuda --dtype bf16 --compile
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gptlab import PRESETS, GPTModel
from gptlab.bench.model import train_settings
from gptlab.bench.timing import autocast, environment, peak_memory, resolve_dtype, time_calls
from gptlab.train.devices import resolve_device, synchronize
from gptlab.errors import ConfigError, did_you_mean
from gptlab.train.loop import train_step
from gptlab.train.recipe import make_optimizer

MODELS = ("gptlab", "hf", "nanogpt", "hand")


# ----------------------------------------------------------------------------------------------
# the GPT fixed by hand (no registry): what the plugin layer must not be slower than
# ----------------------------------------------------------------------------------------------
class HandAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class HandMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class HandBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), HandAttention(d, n_heads, dropout)
        self.norm2, self.mlp = nn.LayerNorm(d), HandMLP(d, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class HandGPT(nn.Module):
    """GPT-2 with every component fixed: pre-LN, LayerNorm, tanh-GELU, learned positions, SDPA."""

    def __init__(self, vocab: int, ctx: int, d: int, n_heads: int, n_layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(HandBlock(d, n_heads, 4 * d, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def load_from_gptlab(self, model: GPTModel) -> None:
        state = {k.replace("position.emb.", "pos_emb."): v for k, v in model.state_dict().items()}
        self.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# nanoGPT (github.com/karpathy/nanoGPT, model.py) rewritten compactly: the same modules, names and
# forward, without its init, generation and optimizer helpers
# ----------------------------------------------------------------------------------------------
class NanoLayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's own; here with the bias, as GPT-2)."""

    def __init__(self, ndim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoCausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class NanoMLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # nanoGPT has nn.GELU() (erf); GPT-2's weights want tanh
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1, self.attn = NanoLayerNorm(n_embd), NanoCausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2, self.mlp = NanoLayerNorm(n_embd), NanoMLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: ``forward(idx, targets)`` -> (logits, loss), the loss computed inside forward
    (over the padded vocabulary, ``ignore_index=-1``); without targets only the last position's
    logits, as nanoGPT does for generation. ``vocab_size`` is padded up to a multiple of 64."""

    def __init__(self, vocab: int, block_size: int, n_embd: int, n_head: int, n_layer: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.real_vocab, self.vocab_size = vocab, -(-vocab // 64) * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(NanoBlock(n_embd, n_head, dropout) for _ in range(n_layer)),
            ln_f=NanoLayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, self.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)  # nanoGPT's init (the padded rows keep it)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None  # inference: the last position only
        return logits, loss

    @torch.no_grad()
    def load_from_gptlab(self, model: GPTModel) -> None:
        names = {"tok_emb.": "transformer.wte.", "position.emb.": "transformer.wpe.", "blocks.": "transformer.h.",
                 "final_norm.": "transformer.ln_f.", "head.": "lm_head.", ".norm1.": ".ln_1.", ".norm2.": ".ln_2.",
                 ".attn.qkv.": ".attn.c_attn.", ".attn.out_proj.": ".attn.c_proj.", ".mlp.fc.": ".mlp.c_fc.",
                 ".mlp.proj.": ".mlp.c_proj."}
        if model.config.vocab_size != self.real_vocab:
            raise ValueError(f"nanogpt: vocabulary {self.real_vocab} differs from gptlab's {model.config.vocab_size}")
        mine = self.state_dict()
        for key, value in model.state_dict().items():
            for old, new in names.items():
                key = key.replace(old, new)
            mine[key][:value.shape[0]].copy_(value)  # the tied wte/lm_head: gptlab's rows; the padding keeps its init


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="see the module docstring for the method")
    p.add_argument("--preset", default=None, help=f"take layers/width/heads/context/vocab from a gptlab preset "
                                                  f"({', '.join(PRESETS)}); e.g. gpt2 for GPT-2 124M")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256, help="context length (position table size)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the context length")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="fp32 or bf16 autocast for every model (default: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds, at least 2 (default: 7)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model per round (default: 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 is steadiest on shared cores)")
    p.add_argument("--hf-activation", default="gelu_pytorch_tanh", choices=("gelu_pytorch_tanh", "gelu_new"),
                   help="HF activation_function: gelu_pytorch_tanh (fused kernel, default) or gelu_new "
                        "(GPT-2's config value, the same function written as Python ops)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="subset of gptlab,hf,nanogpt,hand (gptlab is required; default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.preset is not None:
        if args.preset not in PRESETS:
            p.error(f"unknown preset '{args.preset}'{did_you_mean(args.preset, PRESETS)}; presets: {', '.join(PRESETS)}")
        c = PRESETS[args.preset]
        args.layers, args.width, args.heads = c["n_layers"], c["emb_dim"], c["n_heads"]
        args.ctx, args.vocab = c["context_length"], c["vocab_size"]
    args.seq_len = args.seq_len or args.ctx
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or "gptlab" not in args.models or len(args.models) < 2:
        p.error(f"--models takes gptlab plus at least one of hf, nanogpt, hand (got {','.join(args.models)})")
    if args.seq_len > args.ctx:
        p.error(f"--seq-len {args.seq_len} exceeds the context length {args.ctx}")
    for name in ("layers", "width", "heads", "ctx", "vocab", "batch", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the spread needs two rounds)")
    if args.width % args.heads:
        p.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    return args


def build_models(args) -> dict:
    """HF GPT-2 (random init), gptlab loaded from its saved checkpoint, nanogpt and hand from gptlab."""
    import transformers

    torch.manual_seed(args.seed)
    small_vocab = args.vocab <= 50256
    hf_cfg = transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=args.ctx, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=args.hf_activation,
        layer_norm_epsilon=1e-5, use_cache=False, attn_implementation="sdpa",
        bos_token_id=None if small_vocab else 50256, eos_token_id=None if small_vocab else 50256)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        gl = GPTModel.from_hf_gpt2(tmp)
    models = {"gptlab": gl}
    if "hf" in args.models:
        models["hf"] = hf
    if "nanogpt" in args.models:
        nano = NanoGPT(args.vocab, args.ctx, args.width, args.heads, args.layers)
        nano.load_from_gptlab(gl)
        models["nanogpt"] = nano
    if "hand" in args.models:
        hand = HandGPT(args.vocab, args.ctx, args.width, args.heads, args.layers)
        hand.load_from_gptlab(gl)
        models["hand"] = hand
    return models


def forward_fn(name: str, model: nn.Module):
    """``x -> logits`` of every position over the real vocabulary."""
    if name == "hf":
        return lambda x: model(input_ids=x, use_cache=False).logits
    if name == "nanogpt":  # nanoGPT gives every position's logits only along with a loss
        return lambda x: model(x, targets=x)[0][..., :model.real_vocab]
    return model


def loss_fn(name: str, model: nn.Module):
    """``(x, targets=y) -> mean cross-entropy`` for train_step; gptlab's and nanoGPT's models compute
    their own loss, the others get the cross-entropy written after their logits (compiled with them
    under --compile)."""
    if name == "gptlab":
        return model
    if name == "nanogpt":
        return lambda x, targets: model(x, targets)[1]
    fwd = forward_fn(name, model)

    def loss(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = fwd(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return loss


@torch.no_grad()
def max_logit_diffs(models: dict, args) -> dict:
    """fp32 eval-mode logits of every model against gptlab's, on one short batch (on CPU)."""
    g = torch.Generator().manual_seed(args.seed + 3)
    x = torch.randint(0, args.vocab, (2, min(32, args.seq_len)), generator=g)
    ref = models["gptlab"].eval()(x)
    out = {}
    for name, m in models.items():
        if name != "gptlab":
            out[name] = (forward_fn(name, m.eval())(x) - ref).abs().max().item()
    return out


def count_ops(models: dict, args) -> dict:
    """aten ops dispatched by one training-mode forward+backward of each model (fp32, CPU, a short
    batch; the forward to the logits, the backward from their sum, no loss: nanogpt's count holds its
    loss's forward, as it gives every position's logits only with one), and how many of them read
    a value back to the host (``_local_scalar_dense``: a device sync on GPU). Equal counts mean the
    plugin layer adds no work per step; timings cannot be that exact on a shared machine (and at the
    default size a step's time is in its matmuls, attention and loss, not in its count of small ops)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(args.seed + 4)
    x = torch.randint(0, args.vocab, (2, min(32, args.seq_len)), generator=g)
    out = {}
    for name, m in models.items():
        m.train()
        with Count() as c:
            forward_fn(name, m)(x).float().sum().backward()
        m.zero_grad(set_to_none=True)
        out[name] = {"ops": sum(c.ops.values()), "host_syncs": c.ops["aten._local_scalar_dense.default"]}
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except ConfigError as exc:
        sys.exit(f"vs_reference: error: {exc}")
    import transformers

    models = build_models(args)
    diffs = max_logit_diffs(models, args)
    ops = count_ops(models, args)
    ctx = autocast(device, dtype)
    t = train_settings(dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)

    def fixed_batch():
        return x, y

    steps, compile_errors = {}, {}
    for name, m in models.items():
        m.to(device).train()
        opt = make_optimizer(m, t)
        fwd = loss_fn(name, m)
        if args.compile:
            try:
                fwd = torch.compile(fwd)
            except Exception as exc:  # noqa: BLE001
                compile_errors[name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        # gptlab's own training step (the one `gptlab run` takes), on one fixed batch, no accumulation
        steps[name] = partial(train_step, fwd, opt, fixed_batch, 1, ctx, t.grad_clip, list(m.parameters()))
    for name, step in list(steps.items()):
        try:
            for _ in range(max(1, args.warmup)):  # with --compile the first step compiles
                step()
        except Exception as exc:  # noqa: BLE001 - a model that cannot compile leaves the comparison
            if not args.compile:
                raise
            compile_errors[name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            del steps[name]
    if "gptlab" not in steps or len(steps) < 2:
        sys.exit(f"vs_reference: error: nothing left to compare; compile failed: {compile_errors}")
    synchronize(device)

    tokens = args.batch * args.seq_len * args.steps
    names = list(steps)
    per_round: dict = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        elapsed = dict.fromkeys(names, 0.0)
        for _ in range(args.steps):  # one step each, in turn: A B C A B C ...
            for name in order:
                elapsed[name] += time_calls(steps[name], 1, device)[0]
        for name in names:
            per_round[name].append(tokens / elapsed[name])
    peak = {}
    for name, step in steps.items():
        with peak_memory(device) as mem:
            step()
        peak[name] = None if mem["peak"] is None else mem["peak"] - mem["base"]  # above the resident models

    results = {n: {"tokens_per_s": statistics.median(v), "rounds": v, "peak_mem_bytes": peak[n]}
               for n, v in per_round.items()}
    comparisons = []
    for ref in names[1:]:
        ratios = [a / b for a, b in zip(per_round["gptlab"], per_round[ref])]
        ratio = statistics.median(ratios)  # paired within rounds, so load drift between rounds cancels
        spread = statistics.stdev(ratios)
        within = abs(ratio - 1) < spread
        comparisons.append({"model": "gptlab", "reference": ref, "ratio": ratio,
                            "ratio_of_medians": results["gptlab"]["tokens_per_s"] / results[ref]["tokens_per_s"],
                            "round_ratios": ratios,
                            "spread": spread, "within_noise": within, "target": 1.0,
                            "meets_target": ratio >= 1.0 or within})
    settings = {k: getattr(args, k) for k in ("preset", "layers", "width", "heads", "ctx", "vocab", "batch",
                                              "seq_len", "compile", "rounds", "steps", "warmup", "hf_activation",
                                              "seed")}
    settings.update(lr=t.lr, weight_decay=t.weight_decay, betas=[t.beta1, t.beta2], grad_clip=t.grad_clip,
                    models=names)
    env = environment(device, dtype)
    env["transformers"] = transformers.__version__
    return {"benchmark": "vs_reference", "env": env, "settings": settings, "command": command(args, device, dtype),
            "argv": " ".join(shlex.quote(a) for a in sys.argv), "max_abs_logit_diff_vs_gptlab": diffs,
            "aten_ops_per_fwd_bwd": ops,
            "compile_errors": compile_errors, "models": results, "comparisons": comparisons}


def command(args, device, dtype) -> str:
    words = ["python", "benchmarks/vs_reference.py"]
    if args.preset:
        words += ["--preset", args.preset]
    else:
        words += ["--layers", args.layers, "--width", args.width, "--heads", args.heads, "--ctx", args.ctx,
                  "--vocab", args.vocab]
    words += ["--batch", args.batch, "--seq-len", args.seq_len, "--device", device, "--dtype", dtype,
              "--rounds", args.rounds, "--steps", args.steps, "--warmup", args.warmup,
              "--hf-activation", args.hf_activation, "--models", ",".join(args.models), "--seed", args.seed]
    if args.compile:
        words.append("--compile")
    if args.threads:
        words += ["--threads", args.threads]
    if args.json:
        words.append("--json")
    return " ".join(shlex.quote(str(w)) for w in words)


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    env, s = res["env"], res["settings"]
    load = env.get("load_avg")
    console.print("[bold]gptlab vs reference: training tokens/s[/]")
    console.print(f"device: {env['device']}  dtype: {env['dtype']}  torch {env['torch']}  transformers "
                  f"{env['transformers']}  gptlab {env['gptlab']}" + (f"  load avg {load[0]:.2f}" if load else ""),
                  soft_wrap=True)
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), soft_wrap=True)
    console.print(f"rerun: {res['command']}", soft_wrap=True)
    console.print("same model: max |logits - gptlab logits| (fp32, eval): "
                  + ", ".join(f"{k} {v:.2e}" for k, v in res["max_abs_logit_diff_vs_gptlab"].items()))
    console.print("aten ops per forward+backward (host syncs): "
                  + ", ".join(f"{k} {v['ops']} ({v['host_syncs']})" for k, v in res["aten_ops_per_fwd_bwd"].items()))
    for name, err in res["compile_errors"].items():
        console.print(f"[red]compile failed for {name}[/]: {err}")
    table = Table(title=f"median of {s['rounds']} rounds x {s['steps']} steps, batch {s['batch']} x {s['seq_len']}")
    for col in ("model", "tokens/s", "per round", "step peak mem"):
        table.add_column(col, justify="left" if col in ("model", "per round") else "right")
    for name, r in res["models"].items():
        mem = r["peak_mem_bytes"]
        table.add_row(name, f"{r['tokens_per_s']:,.0f}", " ".join(f"{v:,.0f}" for v in r["rounds"]),
                      "n/a" if mem is None else f"{mem / 2**20:,.0f} MiB")
    console.print(table)
    for c in res["comparisons"]:
        verdict = ("within noise" if c["within_noise"] else
                   ("faster" if c["ratio"] > 1 else "slower"))
        target = "met" if c["meets_target"] else "NOT met"
        console.print(f"gptlab / {c['reference']}: {c['ratio']:.3f}x median of per-round ratios "
                      f"(range {min(c['round_ratios']):.3f}-{max(c['round_ratios']):.3f}, spread (sd) "
                      f"{c['spread']:.3f}; ratio of medians {c['ratio_of_medians']:.3f}) -> {verdict}; "
                      f"target >= {c['target']:.1f}x {target}")


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        report(res)
    return 0 if all(c["meets_target"] for c in res["comparisons"]) and not res["compile_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
