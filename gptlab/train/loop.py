"""Train one run: AdamW, warmup + cosine, clipping, accumulation, periodic eval, metrics rows.

The loop reads the loss back from the device only at log steps, so a GPU never waits on the host
in between. Divergence (a non-finite loss) is detected at those same log steps.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..data.tokens import Batches, TokenData, eval_starts, windows
from .devices import peak_flops, synchronize
from ..config.run import RunSpec
from ..model.gpt import GPTModel
from .distributed import Group, any_rank, mean
from .resume import Resumable, restore, save
from ..rundir import length_key


class Diverged(Exception):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    best_val_step: Optional[int] = None
    last_val: Optional[float] = None
    last_train: Optional[float] = None
    train_time: float = 0.0  # seconds spent in training steps (no eval, no checkpoints, no first-step warm-up)
    checkpoint_time: float = 0.0  # seconds spent writing resumable states
    timed_tokens: int = 0
    init_grad_norms: Optional[list] = None


def lr_at(step: int, t) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine decay to min_lr at the last step."""
    min_lr = t.min_lr if t.min_lr is not None else t.lr / 10
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return min_lr + 0.5 * (t.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay only on tensors of 2 or more dimensions (matrices, embeddings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **extra)


def train_step(step_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], grad_accum: int, ctx: Callable,
               grad_clip: Optional[float], params: list, inspect: Optional[Callable[[], None]] = None,
               no_sync: Callable[[], Any] = nullcontext) -> torch.Tensor:
    """One optimizer step, the way every gptlab run and benchmark takes it.

    ``grad_accum`` micro-batches from ``next_batch``: ``step_model(x, targets=y)`` under ``ctx``
    (autocast or nothing) gives the loss (the model computes it, inside a compiled region when
    the model is compiled), backward of loss / grad_accum; then ``inspect()`` (gradients are
    complete), clipping to ``grad_clip`` (null or 0: off), the optimizer step and
    zero_grad(set_to_none). Returns the mean micro-batch loss as a device tensor: reading it
    is the caller's choice, so the GPU never waits on the host here. Under DDP, ``no_sync`` keeps
    gradients local on every micro-batch but the last, which alone all-reduces.
    """
    total = None
    for micro in range(grad_accum):
        x, y = next_batch()
        with (no_sync() if micro < grad_accum - 1 else nullcontext()):
            with ctx():
                loss = step_model(x, targets=y)
            (loss / grad_accum).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if inspect is not None:
        inspect()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


def autocast_for(t, device: torch.device):
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


@torch.no_grad()
def evaluate(model: GPTModel, tokens, seq_len: int, batches: int, batch_size: int, device: torch.device,
             ctx: Callable) -> Optional[float]:
    """Mean next-token loss on fixed, evenly spaced windows of the validation split."""
    starts = eval_starts(len(tokens), seq_len, batches * batch_size)
    if not starts:
        return None
    was_training = model.training
    model.eval()
    # summed on the device, read once at the end (float64 where the device has it; MPS does not)
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    count = 0
    for i in range(0, len(starts), batch_size):
        x, y = windows(tokens, starts[i:i + batch_size], seq_len, device)
        with ctx():
            loss = model(x, targets=y)  # the model's own (fused) loss: the mean over the batch
        total += loss.to(total.dtype) * y.numel()
        count += y.numel()
    model.train(was_training)
    return float(total) / count  # one host read for the whole evaluation


def train_run(spec: RunSpec, data: TokenData, model: GPTModel, device: torch.device,
              on_log: Callable[[dict], None], on_eval: Callable[[dict], None],
              progress: Callable[[TrainState, dict], None] = lambda s, m: None, *,
              state_dir: Optional[Path] = None, resume_from: Optional[Resumable] = None,
              state_info: Callable[[], dict] = dict, should_stop: Callable[[], bool] = lambda: False,
              group: Group = Group(), warn: Callable[[str], None] = lambda message: None) -> dict:
    """Train ``model`` per ``spec.train``; returns the summary metrics. Raises Diverged.

    With ``state_dir`` (the run directory), a resumable state is saved every
    ``train.checkpoint_every`` steps, with ``state_info()`` added to it (the runner's counters),
    and when ``should_stop()`` turns true at the end of a step, after which KeyboardInterrupt is
    raised. ``resume_from`` continues from such a state: on CPU the result is bit for bit the run
    that was never stopped; a state saved on another kind of device (CPU <-> CUDA) resumes too, not
    bit for bit, and ``warn`` says so. In a torchrun ``group`` the model trains through
    DistributedDataParallel, each rank on its slice of every batch; only rank 0 evaluates and
    reports (the others' callbacks are no-ops and their summary is empty), and every rank sees the
    same stop at the same step: stops are agreed at log steps, so no other step waits on the host.
    """
    t = spec.train
    seq_len = t.seq_len or spec.model.context_length
    model.to(device).train()
    optimizer = make_optimizer(model, t, device)
    ctx = autocast_for(t, device)
    batches = Batches(data.train, t.batch_size, seq_len, spec.seed, device, (group.rank, group.world))
    params = list(model.parameters())
    step_model, compile_note, no_sync = model, None, nullcontext
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        # buffers are deterministic (position tables, masks): nothing to broadcast before each step
        # (newer torch names the switch forward_sync_buffers and deprecates broadcast_buffers)
        known = inspect.signature(DistributedDataParallel.__init__).parameters
        quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                             **quiet)
        no_sync = step_model.no_sync
    if t.compile:
        step_model, compile_note = compile_or_fallback(step_model, (t.batch_size // group.world, seq_len), device, ctx)
    state = TrainState()
    tokens_per_step = t.batch_size * t.grad_accum * seq_len
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    generators = rng_generators(batches, device)
    first = 1
    if resume_from is not None:
        saved_on = resume_from.info.get("device_type", "cpu" if "rng.cuda" not in resume_from.tensors else "cuda")
        if saved_on != device.type:
            warn(f"{resume_from.path}: saved on {saved_on}, resumed on {device.type}: the run continues, but not "
                 f"bit for bit as it would have on {saved_on} (other kernels and random streams)")
        restore(resume_from, model, optimizer, generators)
        loop = resume_from.info["loop"]
        state = TrainState(**{**loop["state"], "best_val": _inf(loop["state"]["best_val"])})
        loss_sum.fill_(loop["loss_sum"])
        loss_count = loop["loss_count"]
        first = resume_from.step + 1

    def save_state(step: int) -> None:
        loop = {"state": {**asdict(state), "best_val": _finite(state.best_val)},
                "loss_sum": loss_sum.item(), "loss_count": loss_count}
        save(state_dir, step, model, optimizer, generators, {"loop": loop, "device_type": device.type, **state_info()},
             t.checkpoint_keep)

    synchronize(device)
    interval_start = time.perf_counter()
    interval_tokens = 0
    for step in range(first, t.steps + 1):
        lr = lr_at(step, t)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        # Xiong et al. (2020): at init, post-LN gradients grow toward the output, pre-LN's are flat
        inspect = (lambda: setattr(state, "init_grad_norms", block_grad_norms(model))) if step == 1 else None
        loss_sum += train_step(step_model, optimizer, batches.next, t.grad_accum, ctx, t.grad_clip, params, inspect,
                               no_sync=no_sync)
        loss_count += 1
        state.step, state.tokens = step, state.tokens + tokens_per_step
        interval_tokens += tokens_per_step
        if step == first:  # the first step pays for warm-up (allocator, compile): keep it out of tokens/s
            synchronize(device)
            interval_start, interval_tokens = time.perf_counter(), 0
        log_step = not (step % t.log_every and step % t.eval_every and step != t.steps)
        if log_step:
            train_loss = mean(loss_sum / max(1, loss_count), group).item()  # the only host sync in the loop
            elapsed = time.perf_counter() - interval_start
            if interval_tokens:
                state.train_time += elapsed
                state.timed_tokens += interval_tokens
            loss_sum.zero_()
            loss_count = 0
            if not math.isfinite(train_loss):
                raise Diverged(step, train_loss)
            state.last_train = train_loss
            row = {"step": step, "tokens": state.tokens, "train_loss": train_loss, "lr": lr,
                   "tokens_per_s": interval_tokens / elapsed if interval_tokens and elapsed > 0 else None}
            if (step % t.eval_every == 0 or step == t.steps) and group.main:
                val = evaluate(model, data.val, seq_len, t.eval_batches, t.batch_size, device, ctx)
                row["val_loss"] = val
                state.last_val = val
                if val is not None and val < state.best_val:
                    state.best_val, state.best_val_step = val, step
                on_eval({"step": step, "val_loss": val})
            on_log(row)
            progress(state, row)
            synchronize(device)
            interval_start, interval_tokens = time.perf_counter(), 0
        if step < t.steps and (state_dir is not None or group.active):
            # one decision for every rank, agreed where the loop already reads the device (log steps)
            stop = any_rank(should_stop(), group, device) if (log_step or not group.active) else False
            if state_dir is not None and (stop or (t.checkpoint_every and step % t.checkpoint_every == 0)):
                synchronize(device)  # the steps queued so far are training time, not checkpoint time
                saving = time.perf_counter()
                save_state(step)
                spent = time.perf_counter() - saving
                state.checkpoint_time += spent
                interval_start += spent
            if stop:
                raise KeyboardInterrupt

    if not group.main:
        return {}
    summary = {
        "final_train_loss": state.last_train,
        "final_val_loss": state.last_val,
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "best_val_step": state.best_val_step,
        "tokens": state.tokens,
        "tokens_per_s": state.timed_tokens / state.train_time if state.train_time > 0 else None,
        "train_time_s": state.train_time,
        "checkpoint_time_s": state.checkpoint_time,
        "init_grad_norms": state.init_grad_norms,
    }
    if compile_note:
        summary["compile"] = compile_note
    flops = model.flops_per_token(seq_len)
    peak = peak_flops(device)
    summary["flops_per_token"] = flops
    # tokens/s counts the whole job; MFU is one device's share against one device's peak
    per_device = summary["tokens_per_s"] / group.world if summary["tokens_per_s"] else None
    summary["tokens_per_s_per_device"] = per_device
    summary["mfu"] = (per_device * flops / peak) if peak and per_device else None
    summary.update(length_extrapolation(model, data, t, seq_len, device, ctx))
    return summary


def rng_generators(batches: Batches, device: torch.device) -> dict:
    """Every random stream a run draws from: torch's global generator (dropout, init), the batch
    sampler's, and CUDA's on a GPU. Their states are part of a resumable state."""
    gens = {"torch": torch.random.default_generator, "batches": batches.gen}
    if device.type == "cuda":
        gens["cuda"] = torch.cuda.default_generators[device.index or 0]
    return gens


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _inf(x: Optional[float]) -> float:
    return math.inf if x is None else x


def block_grad_norms(model: GPTModel) -> list[float]:
    """Gradient norm of each block's parameters, input side first."""
    norms = []
    for block in model.blocks:
        grads = [p.grad.float().pow(2).sum() for p in block.parameters() if p.grad is not None]
        norms.append(float(torch.stack(grads).sum().sqrt()) if grads else 0.0)
    return norms


def compile_or_fallback(model: GPTModel, shape: tuple, device: torch.device,
                        ctx: Callable) -> tuple[torch.nn.Module, str]:
    """torch.compile the model, or say why not and train eagerly.

    Compilation happens on the first forward and backward, so one probe step (on zeros, leaving
    the data stream untouched) surfaces a failure here instead of in the middle of the loop.
    Graph breaks do not fail, but they are named in the note, since they cost speed.
    """
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        compiled = torch.compile(model)
        # the probe's dropout must not advance the random streams: a resumed run probes again
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            # inputs and targets laid out as real batches are (views of one (B, T + 1) window), so
            # the first real step finds the graph compiled for its strides and does not recompile
            B, T = shape
            window = torch.zeros((B, T + 1), dtype=torch.long, device=device)
            with ctx():
                loss = compiled(window[:, :-1], targets=window[:, 1:])
            loss.backward()
        model.zero_grad(set_to_none=True)
    except Exception as exc:  # dynamo/inductor errors come in many types
        model.zero_grad(set_to_none=True)
        reason = " ".join(str(exc).split())[:300]
        return model, f"fell back to eager: {type(exc).__name__}: {reason}"
    breaks = counters.get("graph_break", {})
    if breaks:
        reasons = "; ".join(" ".join(str(r).split())[:120] for r in list(breaks)[:3])
        return compiled, f"compiled with {sum(breaks.values())} graph break(s): {reasons}"
    return compiled, "compiled"


def length_extrapolation(model: GPTModel, data: TokenData, t, seq_len: int, device: torch.device,
                         ctx: Callable) -> dict:
    """Validation loss at each multiple of the training length in ``train.eval_lengths``."""
    out: dict[str, Any] = {}
    notes = {}
    for m in t.eval_lengths:
        key = length_key(m)
        length = int(round(m * seq_len))
        limit = model.max_length
        if limit is not None and length > limit:
            out[key] = None
            notes[key] = (f"position '{model.components['position']}' cannot encode {length} tokens "
                          f"(trained limit {limit})")
            continue
        if len(data.val) < length + 1:
            out[key] = None
            notes[key] = f"validation split has {len(data.val)} tokens, fewer than {length + 1}"
            continue
        out[key] = evaluate(model, data.val, length, t.eval_batches, max(1, t.batch_size * seq_len // length),
                            device, ctx)
    if notes:
        out["notes"] = notes
    return out
