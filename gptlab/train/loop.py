"""Train one run: the recipe's optimizer and schedule, clipping, accumulation, periodic eval, metrics rows.

The loop reads the loss back from the device only at log steps, so a GPU never waits on the host
in between. Divergence (a non-finite loss) is detected at those same log steps.
"""
from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..data.tokens import Batches, TokenData, eval_starts, experiment_dir, windows
from .devices import peak_flops, synchronize
from ..config.run import RunSpec, TrainConfig
from ..config.model import ComponentSpec
from ..errors import ConfigError, PluginError, one_line
from ..model.gpt import GPTModel
from .distributed import Group, any_rank, mean
from .recipe import make_optimizer, make_schedule, set_rates
from .resume import Resumable, restore, save
from ..plugin.components import after_step, pop_aux_losses
from ..plugin.contract import Schedule
from ..plugin.manager import PluginSystem, default_plugins
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
    last_val_bpb: Optional[float] = None
    last_train: Optional[float] = None
    train_time: float = 0.0  # seconds spent in training steps (no eval, no checkpoints, no first-step warm-up)
    checkpoint_time: float = 0.0  # seconds spent writing resumable states
    timed_tokens: int = 0
    init_grad_norms: Optional[list] = None


def train_step(step_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], grad_accum: int, ctx: Callable,
               grad_clip: Optional[float], params: list, inspect: Optional[Callable[[], None]] = None,
               no_sync: Callable[[], Any] = nullcontext, aux: Optional[dict] = None) -> torch.Tensor:
    """One optimizer step, the way every gptlab run and benchmark takes it.

    ``grad_accum`` micro-batches from ``next_batch``: ``step_model(x, targets=y)`` under ``ctx``
    (autocast or nothing) gives the loss (the model computes it, inside a compiled region when
    the model is compiled), backward of loss / grad_accum; then ``inspect()`` (gradients are
    complete), clipping to ``grad_clip`` (null or 0: off), the optimizer step and
    zero_grad(set_to_none). Returns the mean micro-batch loss as a device tensor: reading it
    is the caller's choice, so the GPU never waits on the host here. Under DDP, ``no_sync`` keeps
    gradients local on every micro-batch but the last, which alone all-reduces. Auxiliary losses
    that components added in the forward (``gptlab.aux_loss``) join the objective with their
    weights; the returned loss stays the next-token loss, and ``aux`` (name -> device tensor), when
    given, accumulates each one's mean over the micro-batches.
    """
    total = None
    for micro in range(grad_accum):
        x, y = next_batch()
        with (no_sync() if micro < grad_accum - 1 else nullcontext()):
            with ctx():
                loss = step_model(x, targets=y)
            objective = loss
            for name, (value, weight) in pop_aux_losses(step_model).items():
                if weight is not None:  # None: a diagnostic, logged only
                    objective = objective + weight * value
                if aux is not None:
                    part = value.detach().float() / grad_accum
                    aux[name] = part if name not in aux else aux[name] + part
            (objective / grad_accum).backward()
            pop_aux_losses(step_model)  # gradient checkpointing's recomputed forward added them again
        total = loss.detach() if total is None else total + loss.detach()
    if inspect is not None:
        inspect()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after_step(step_model)
    return total / grad_accum


def autocast_for(t, device: torch.device):
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


@torch.no_grad()
def evaluate(model: GPTModel, tokens, seq_len: int, batches: int, batch_size: int, device: torch.device,
             ctx: Callable, token_bytes: Optional[torch.Tensor] = None, extra: Optional[dict] = None) -> Optional[float]:
    """Mean next-token loss on fixed, evenly spaced windows of the validation split. With
    ``token_bytes`` (UTF-8 bytes per token id, on ``device``) it also puts the bits per byte of the
    same windows in ``extra["val_bpb"]``: the summed loss in bits over the targets' bytes."""
    starts = eval_starts(len(tokens), seq_len, batches * batch_size)
    if not starts:
        return None
    was_training = model.training
    model.eval()
    # summed on the device, read once at the end (float64 where the device has it; MPS does not)
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    count, text_bytes = 0, torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(starts), batch_size):
        x, y = windows(tokens, starts[i:i + batch_size], seq_len, device)
        with ctx():
            loss = model(x, targets=y)  # the model's own (fused) loss: the mean over the batch
        total += loss.to(total.dtype) * y.numel()
        count += y.numel()
        if token_bytes is not None:
            text_bytes += token_bytes[y].sum()
    model.train(was_training)
    nats = float(total)  # one host read for the whole evaluation
    if token_bytes is not None and extra is not None:
        extra["val_bpb"] = nats / math.log(2) / int(text_bytes) if int(text_bytes) else None
    return nats / count


@dataclass
class _Run:
    """What train_run's phases share: built (or restored) once by _setup, advanced by the step loop."""

    train: TrainConfig
    seq_len: int
    model: GPTModel
    device: torch.device
    group: Group
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    flops_per_token: float  # training FLOPs of one token (active parameters), for the rows' cumulative count
    token_bytes: Optional[torch.Tensor]  # UTF-8 bytes per token id (bits per byte); None: the tokenizer cannot say
    log_groups: bool  # whether rows carry each param group's lr (groups whose rates differ)
    ctx: Callable
    batches: Batches
    params: list
    step_model: torch.nn.Module
    no_sync: Callable[[], Any]
    compile_note: Optional[str]
    generators: dict
    loss_sum: torch.Tensor  # train losses since the last log step, summed on the device
    tokens_per_step: int
    evals: list = field(default_factory=list)  # (registered name, Eval) of ``evals:``; rank 0 only
    #: the last evaluation step's eval metrics, by full name. Not part of a resumable state: the last
    #: step always evaluates, after any resume, so the summary never needs an earlier attempt's
    last_evals: dict = field(default_factory=dict)
    state: TrainState = field(default_factory=TrainState)
    aux_sum: dict = field(default_factory=dict)  # auxiliary losses since the last log step, by name
    last_aux: dict = field(default_factory=dict)  # the auxiliary losses of the last log step
    loss_count: int = 0
    first: int = 1  # the first step this process takes (past the resumed state's step)
    interval_start: float = 0.0  # perf_counter at the start of the timed interval
    interval_tokens: int = 0  # tokens trained in the timed interval


def train_run(spec: RunSpec, data: TokenData, model: GPTModel, device: torch.device,
              on_log: Callable[[dict], None], on_eval: Callable[[dict], None],
              progress: Callable[[TrainState, dict], None] = lambda s, m: None, *,
              state_dir: Optional[Path] = None, resume_from: Optional[Resumable] = None,
              state_info: Callable[[], dict] = dict, should_stop: Callable[[], bool] = lambda: False,
              group: Group = Group(), warn: Callable[[str], None] = lambda message: None,
              plugins: Optional[PluginSystem] = None) -> dict:
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
    run = _setup(spec, data, model, device, group, plugins)
    if resume_from is not None:
        _resume(run, resume_from, warn)
    _train_steps(run, data, on_log, on_eval, progress, state_dir, state_info, should_stop)
    return _summary(run, data) if group.main else {}


def _setup(spec: RunSpec, data: TokenData, model: GPTModel, device: torch.device, group: Group,
           plugins: Optional[PluginSystem]) -> _Run:
    """Everything a run trains with, built before a resume restores into it (optimizer, random streams)."""
    t = spec.train
    seq_len = t.seq_len or spec.model.context_length
    model.to(device).train()
    optimizer = make_optimizer(model, t, plugins)
    schedule = make_schedule(t, plugins)
    log_groups = bool(t.param_groups) or len({g["peak_lr"] for g in optimizer.param_groups}) > 1
    ctx = autocast_for(t, device)
    batches = Batches(data.train, t.batch_size, seq_len, spec.seed, device, (group.rank, group.world))
    params = list(model.parameters())
    step_model, compile_note, no_sync = model, None, nullcontext
    if group.active:
        step_model = _ddp_wrap(model, device)
        no_sync = step_model.no_sync
    if t.compile:
        step_model, compile_note = compile_or_fallback(step_model, (t.batch_size // group.world, seq_len), device, ctx)
    # only rank 0 evaluates (as it alone computes val_loss): the other ranks build nothing to call
    evals = make_evals(spec.evals, plugins, spec.base_dir) if group.main and spec.evals else []
    return _Run(train=t, seq_len=seq_len, model=model, device=device, group=group, optimizer=optimizer,
                schedule=schedule, log_groups=log_groups, flops_per_token=model.flops_per_token(seq_len),
                token_bytes=_token_bytes(data, device), ctx=ctx,
                batches=batches, params=params, step_model=step_model, no_sync=no_sync, compile_note=compile_note,
                generators=rng_generators(batches, device), loss_sum=torch.zeros((), device=device),
                tokens_per_step=t.batch_size * t.grad_accum * seq_len, evals=evals)


def _token_bytes(data: TokenData, device: torch.device) -> Optional[torch.Tensor]:
    """UTF-8 bytes per token id of the run's tokenizer, for bits per byte (None if it cannot tell)."""
    tokenizer = getattr(data, "tokenizer", None)
    try:
        counts = tokenizer.token_bytes(list(range(tokenizer.vocab_size)))
    except Exception:  # a tokenizer plugin without decode for single ids: no bits per byte
        return None
    return torch.tensor(counts, dtype=torch.int64, device=device)


def _ddp_wrap(model: GPTModel, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without per-step buffer broadcasts, on any torch version."""
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    # buffers are deterministic (position tables, masks): nothing to broadcast before each step
    # (newer torch names the switch forward_sync_buffers and deprecates broadcast_buffers)
    known = inspect.signature(DistributedDataParallel.__init__).parameters
    quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **quiet)


def _resume(run: _Run, resume_from: Resumable, warn: Callable[[str], None]) -> None:
    """Continue from a saved state: weights, optimizer, random streams and the loop's counters."""
    device = run.device
    saved_on = resume_from.info.get("device_type", "cpu" if "rng.cuda" not in resume_from.tensors else "cuda")
    if saved_on != device.type:
        warn(f"{resume_from.path}: saved on {saved_on}, resumed on {device.type}: the run continues, but not "
             f"bit for bit as it would have on {saved_on} (other kernels and random streams)")
    restore(resume_from, run.model, run.optimizer, run.generators)
    loop = resume_from.info["loop"]
    run.state = TrainState(**{**loop["state"], "best_val": _inf(loop["state"]["best_val"])})
    run.loss_sum.fill_(loop["loss_sum"])
    run.aux_sum = {name: torch.tensor(value, device=device) for name, value in loop.get("aux_sum", {}).items()}
    run.loss_count = loop["loss_count"]
    run.first = resume_from.step + 1


def _save_state(run: _Run, state_dir: Path, step: int, state_info: Callable[[], dict]) -> None:
    """The loop's counters go in as plain numbers (an infinite best_val as null), so _resume reads them back."""
    state = run.state
    loop = {"state": {**asdict(state), "best_val": _finite(state.best_val)},
            "loss_sum": run.loss_sum.item(), "loss_count": run.loss_count,
            "aux_sum": {name: value.item() for name, value in run.aux_sum.items()}}
    save(state_dir, step, run.model, run.optimizer, run.generators,
         {"loop": loop, "device_type": run.device.type, **state_info()}, run.train.checkpoint_keep)


def _train_steps(run: _Run, data: TokenData, on_log: Callable[[dict], None], on_eval: Callable[[dict], None],
                 progress: Callable[[TrainState, dict], None], state_dir: Optional[Path],
                 state_info: Callable[[], dict], should_stop: Callable[[], bool]) -> None:
    """Steps ``run.first`` to the last; the device is read back only at log steps."""
    t, device = run.train, run.device
    synchronize(device)
    run.interval_start, run.interval_tokens = time.perf_counter(), 0
    for step in range(run.first, t.steps + 1):
        rates = set_rates(run.optimizer, run.schedule, step)
        # Xiong et al. (2020): at init, post-LN gradients grow toward the output, pre-LN's are flat
        inspect = (lambda: setattr(run.state, "init_grad_norms", block_grad_norms(run.model))) if step == 1 else None
        run.loss_sum += train_step(run.step_model, run.optimizer, run.batches.next, t.grad_accum, run.ctx,
                                   t.grad_clip, run.params, inspect, no_sync=run.no_sync, aux=run.aux_sum)
        run.loss_count += 1
        run.state.step, run.state.tokens = step, run.state.tokens + run.tokens_per_step
        run.interval_tokens += run.tokens_per_step
        if step == run.first:  # the first step pays for warm-up (allocator, compile): keep it out of tokens/s
            synchronize(device)
            run.interval_start, run.interval_tokens = time.perf_counter(), 0
        log_step = not (step % t.log_every and step % t.eval_every and step != t.steps)
        if log_step:
            _log_step(run, step, rates, data, on_log, on_eval, progress)
        if step < t.steps and (state_dir is not None or run.group.active):
            _checkpoint_or_stop(run, step, log_step, state_dir, state_info, should_stop)


def _log_step(run: _Run, step: int, rates: dict, data: TokenData, on_log: Callable[[dict], None],
              on_eval: Callable[[dict], None], progress: Callable[[TrainState, dict], None]) -> None:
    """Read the mean train loss back, evaluate when due, report the row; raises Diverged."""
    t, state = run.train, run.state
    names = sorted(run.aux_sum)  # the loss and each auxiliary loss, reduced across ranks in one go
    sums = torch.stack([run.loss_sum, *(run.aux_sum[name] for name in names)]) if names else run.loss_sum
    values = mean(sums / max(1, run.loss_count), run.group).reshape(-1).tolist()  # the only host sync in the loop
    train_loss = values[0]
    if names:
        run.last_aux, run.aux_sum = dict(zip(names, values[1:])), {}
    elapsed = time.perf_counter() - run.interval_start
    if run.interval_tokens:
        state.train_time += elapsed
        state.timed_tokens += run.interval_tokens
    run.loss_sum.zero_()
    run.loss_count = 0
    if not math.isfinite(train_loss):
        raise Diverged(step, train_loss)
    state.last_train = train_loss
    row = {"step": step, "tokens": state.tokens, "flops": state.tokens * run.flops_per_token,
           "time_s": state.train_time, "train_loss": train_loss, "lr": run.schedule.lr(step, t.lr),
           "tokens_per_s": run.interval_tokens / elapsed if run.interval_tokens and elapsed > 0 else None}
    if run.log_groups:
        row.update({f"lr/{name}": rate for name, rate in rates.items()})
    row.update({f"aux/{name}": _finite(value) for name, value in run.last_aux.items()})
    if (step % t.eval_every == 0 or step == t.steps) and run.group.main:
        extra: dict = {}
        val = evaluate(run.model, data.val, run.seq_len, t.eval_batches, t.batch_size, run.device, run.ctx,
                       run.token_bytes, extra)
        row["val_loss"] = val
        if extra.get("val_bpb") is not None:
            row["val_bpb"] = state.last_val_bpb = extra["val_bpb"]
        state.last_val = val
        if val is not None and val < state.best_val:
            state.best_val, state.best_val_step = val, step
        scores = run_evals(run.evals, run.model, getattr(data, "tokenizer", None), run.device, run.ctx)
        row.update(scores)
        run.last_evals = scores
        on_eval({"step": step, "val_loss": val, **scores})
    on_log(row)
    progress(state, row)
    synchronize(run.device)
    run.interval_start, run.interval_tokens = time.perf_counter(), 0


def _checkpoint_or_stop(run: _Run, step: int, log_step: bool, state_dir: Optional[Path],
                        state_info: Callable[[], dict], should_stop: Callable[[], bool]) -> None:
    """Save a resumable state when due or stopping (time kept apart from training); raises KeyboardInterrupt."""
    t, group = run.train, run.group
    # one decision for every rank, agreed where the loop already reads the device (log steps)
    stop = any_rank(should_stop(), group, run.device) if (log_step or not group.active) else False
    if state_dir is not None and (stop or (t.checkpoint_every and step % t.checkpoint_every == 0)):
        synchronize(run.device)  # the steps queued so far are training time, not checkpoint time
        saving = time.perf_counter()
        _save_state(run, state_dir, step, state_info)
        spent = time.perf_counter() - saving
        run.state.checkpoint_time += spent
        run.interval_start += spent
    if stop:
        raise KeyboardInterrupt


def _summary(run: _Run, data: TokenData) -> dict:
    """The run's summary metrics (rank 0 only): losses, throughput, MFU per device, length extrapolation."""
    state, model, device, group = run.state, run.model, run.device, run.group
    summary = {
        "final_train_loss": state.last_train,
        "final_val_loss": state.last_val,
        "final_val_bpb": state.last_val_bpb,
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "best_val_step": state.best_val_step,
        "tokens": state.tokens,
        "tokens_per_s": state.timed_tokens / state.train_time if state.train_time > 0 else None,
        "train_time_s": state.train_time,
        "checkpoint_time_s": state.checkpoint_time,
        "init_grad_norms": state.init_grad_norms,
    }
    if run.last_aux:  # as last logged: the training objective's other terms, apart from the losses
        summary["aux_losses"] = {name: _finite(value) for name, value in run.last_aux.items()}
    if run.compile_note:
        summary["compile"] = run.compile_note
    flops = model.flops_per_token(run.seq_len)
    peak = peak_flops(device)
    summary["flops_per_token"] = flops
    # tokens/s counts the whole job; MFU is one device's share against one device's peak
    per_device = summary["tokens_per_s"] / group.world if summary["tokens_per_s"] else None
    summary["tokens_per_s_per_device"] = per_device
    summary["mfu"] = (per_device * flops / peak) if peak and per_device else None
    summary.update(length_extrapolation(model, data, run.train, run.seq_len, device, run.ctx))
    if run.last_evals:  # as the last step measured them; eval_metrics names them for tables
        summary.update(run.last_evals)
        summary["eval_metrics"] = list(run.last_evals)
    return summary


# ---------------------------------------------------------------------------------------------
# Downstream evaluations (the eval kind, ``evals:``)
# ---------------------------------------------------------------------------------------------
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def make_evals(specs: "tuple[ComponentSpec, ...]", plugins: Optional[PluginSystem] = None,
               base_dir: Optional[Path] = None) -> list:
    """(name, Eval) for each spec of ``evals:``, its options checked like any component's and its
    factory called with relative paths starting at ``base_dir`` (the experiment file's folder).
    Preflight calls this too, so an unknown name, a bad option or a missing file is a one-line
    ConfigError before anything trains."""
    plugins = plugins or default_plugins()
    out = []
    for spec in specs:
        key = f"evals.{spec.name}"
        try:
            entry = plugins.registry.lookup("eval", spec.name, spec.options)
        except ConfigError as exc:
            raise ConfigError(f"evals: {exc}") from None
        try:
            with experiment_dir(base_dir):
                built = entry.factory(**spec.options)
        except ConfigError as exc:  # the plugin's own words; they name the key unless it forgot
            text = str(exc)
            raise ConfigError(text if key in text else f"{key}: {text}") from None
        except Exception as exc:  # a missing required option (TypeError) or a value the types let through
            raise ConfigError(f"{key} cannot be built ({one_line(exc, kind=True)}); check its options in "
                              f"evals: {spec.to_plain()}") from None
        if not callable(built):
            raise PluginError(f"eval '{spec.name}' (plugin {entry.plugin}) returned {type(built).__name__}, "
                              f"not a callable gptlab.Eval")
        out.append((spec.name, built))
    return out


def run_evals(evals: list, model: torch.nn.Module, tokenizer: Any, device: torch.device,
              ctx: Callable) -> dict:
    """Every eval's metrics as ``<name>_<metric>``. Each runs on the bare model in eval mode under
    no_grad and inside a fork of the random streams, so adding an eval never changes what the run
    trains (nor a resumed run's continuation); training mode is restored after."""
    out: dict[str, Optional[float]] = {}
    if not evals:
        return out
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            for name, evaluate_fn in evals:
                metrics = evaluate_fn(model, tokenizer, device, ctx)
                if not isinstance(metrics, dict):
                    raise PluginError(f"eval '{name}' returned {type(metrics).__name__}, not a dict of metric -> number")
                for metric, value in metrics.items():
                    if not isinstance(metric, str) or not _METRIC_NAME.match(metric):
                        raise PluginError(f"eval '{name}' returned the metric name {metric!r}; use letters, digits "
                                          f"and _ (gptlab logs it as {name}_<metric>)")
                    number = None if value is None or isinstance(value, bool) else float(value)
                    out[f"{name}_{metric}"] = number if number is not None and math.isfinite(number) else None
    finally:
        model.train(was_training)
    return out


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
            pop_aux_losses(model)  # the probe's auxiliary terms are not the first step's
        model.zero_grad(set_to_none=True)
    except Exception as exc:  # dynamo/inductor errors come in many types
        model.zero_grad(set_to_none=True)
        pop_aux_losses(model)
        reason = one_line(exc, 300)
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
