"""The GPU path, checked on CPU (issue 21): indexed CUDA devices, the loss inside the model, padded
vocabulary rows that are never predicted, no fp32 copy of the full logits under compile, no
recompile after the first step, per-device MFU without per-step host syncs, checkpoint time kept
apart from training time, and resuming a state saved on another kind of device.

Nothing here needs a GPU or the network: CUDA availability is faked with monkeypatch where the
code decides, the distributed tests use gloo on CPU, and every model is tiny.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import gptlab.train.devices as devices
import gptlab.train.loop as gtrain
from gptlab import GPTModel
from gptlab.data.tokens import Batches, TokenData
from gptlab.train.distributed import Group
from gptlab.errors import ConfigError
from gptlab.run.experiment import load_experiment
from gptlab.plugin.manager import PluginSystem
from gptlab.config.run import TrainConfig

from helpers import TINY, randomize_, run_subprocess, write_lab

CPU = torch.device("cpu")


def builtin_positions() -> list[str]:
    """Every built-in position scheme (the built-ins alone: collection runs in the checkout, whose
    ./plugins the process-wide default system would also load)."""
    system = PluginSystem()
    system.load_builtins()
    return system.registry.names("position")


# ---------------------------------------------------------------------------------------------
# 1. device indices and the peak table
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices, the current one being cuda:1 (faked where resolve_device asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cuda_and_auto_resolve_to_the_current_indexed_device(fake_cuda):
    """'cuda' and 'auto' come back as cuda:<current device>, never as an index-less 'cuda'."""
    for name in ("cuda", "auto"):
        dev = devices.resolve_device(name)
        assert dev == torch.device("cuda", 1), name
        assert dev.index == 1, name


def test_an_explicit_cuda_index_is_kept_and_checked(fake_cuda):
    """'cuda:1' stays cuda:1 and 'cuda:0' cuda:0; 'cuda:5' on a 2-device machine is a ConfigError naming it."""
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="cuda:5"):
        devices.resolve_device("cuda:5")


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    """Without CUDA, 'cuda' is refused with a ConfigError and 'auto' falls back to an available device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    assert devices.resolve_device("auto").type == ("mps" if torch.backends.mps.is_available() else "cpu")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA Imaginary X1", None),
])
def test_peak_for_name_matches_the_most_specific_whole_name(name, peak):
    """The peak table matches whole names, most specific first ('L4' is not an 'L40', 'H200' not 'H200 NVL')."""
    assert devices.peak_for_name(name) == peak


# ---------------------------------------------------------------------------------------------
# 2. the loss inside the model, and padded vocabulary rows
# ---------------------------------------------------------------------------------------------

V = 250  # vocab_multiple 64 pads it to 256 rows
PADDED_CFG = dict(vocab_size=V, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def padded_model(multiple=64, seed=0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel({**PADDED_CFG, "vocab_multiple": multiple, **overrides})


def head_output(model: GPTModel, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """model(x) and the raw (B, T, padded rows) output of its head, caught by a forward hook."""
    seen = []
    handle = model.head.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("multiple", [None, 64])
def test_model_loss_equals_cross_entropy_of_its_logits(multiple):
    """GPTModel(x, targets=y) is F.cross_entropy of model(x) over vocab_size classes, padded or not."""
    model = randomize_(padded_model(multiple), seed=1)
    x = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (3, 20, V)
    loss = model(x, targets=y)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)), rtol=1e-6, atol=1e-6)


def _make_padded_rows_win(model: GPTModel) -> None:
    """Give the padded head rows weights that beat every real row at every position: the final
    norm's bias points along u and the padded rows are large multiples of u."""
    with torch.no_grad():
        u = torch.randn(model.config.emb_dim, generator=torch.Generator().manual_seed(3))
        u /= u.norm()
        model.final_norm.weight.fill_(0.1)
        model.final_norm.bias.copy_(3.0 * u)
        model.head.weight[V:] = 4.0 * u


def test_padded_rows_get_no_probability_mass_and_no_gradient():
    """With padding: exactly vocab_size logits, the loss is the CE over the first vocab_size head
    outputs only, and the padded head/embedding rows get zero gradient."""
    model = padded_model(64, tie_embeddings=False)
    assert model.head.weight.shape[0] == 256 and model.tok_emb.weight.shape[0] == 256
    _make_padded_rows_win(model)
    x = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(1))
    logits, (full,) = head_output(model, x)
    assert logits.shape[-1] == V and full.shape[-1] == 256
    torch.testing.assert_close(logits, full[..., :V], rtol=0, atol=0)
    assert (full.argmax(-1) >= V).all(), "control: the padded rows should dominate the raw head output"

    loss = model(x, targets=y)
    only_real = F.cross_entropy(full[..., :V].reshape(-1, V), y.reshape(-1))
    with_padding = F.cross_entropy(full.reshape(-1, 256), y.reshape(-1))
    torch.testing.assert_close(loss, only_real, rtol=1e-6, atol=1e-6)
    assert (with_padding - loss).abs() > 1.0, "control: counting the padded rows would change the loss"

    loss.backward()
    assert torch.count_nonzero(model.head.weight.grad[V:]) == 0
    assert torch.count_nonzero(model.tok_emb.weight.grad[V:]) == 0
    assert torch.count_nonzero(model.head.weight.grad[:V]) > 0  # the real rows do learn


def test_padded_rows_of_a_tied_head_get_no_gradient():
    """Tied embedding and head (the default): the shared padded rows get zero gradient from the loss."""
    model = randomize_(padded_model(64), seed=2)
    assert model.head.weight is model.tok_emb.weight
    x = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(1))
    model(x, targets=y).backward()
    assert torch.count_nonzero(model.tok_emb.weight.grad[V:]) == 0
    assert torch.count_nonzero(model.tok_emb.weight.grad[:V]) > 0


def test_generation_never_produces_a_padded_id():
    """Greedy and sampled generation (temperature 1, with and without the KV cache) never emit an id
    >= vocab_size, even when the padded rows would win every position if they were not masked."""
    model = padded_model(64, tie_embeddings=False)
    _make_padded_rows_win(model)
    prompt = torch.randint(0, V, (32, 4), generator=torch.Generator().manual_seed(0))
    _, (full,) = head_output(model.eval(), prompt)
    assert (full.argmax(-1) >= V).all(), "control: unmasked, the padded rows would be chosen"

    greedy = model.generate(prompt, 24, temperature=0.0)
    sampled = model.generate(prompt, 24, temperature=1.0, generator=torch.Generator().manual_seed(1))
    uncached = model.generate(prompt, 24, temperature=1.0, use_cache=False,
                              generator=torch.Generator().manual_seed(2))
    for out in (greedy, sampled, uncached):
        assert out.shape == (32, 28)
        assert int(out.max()) < V
    assert len(torch.unique(sampled[:, 4:])) > 20  # many distinct samples were drawn (32 x 24 of them)


# ---------------------------------------------------------------------------------------------
# 3. train_step's losses equal the old way's
# ---------------------------------------------------------------------------------------------

def old_train_step(model, optimizer, next_batch, grad_accum, ctx, grad_clip, params):
    """The step as it was before the loss moved into the model: logits, then an fp32 cross-entropy."""
    total = 0.0
    for _ in range(grad_accum):
        x, y = next_batch()
        with ctx():
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        (loss / grad_accum).backward()
        total = total + loss.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


@pytest.mark.parametrize("multiple", [None, 64])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_losses_equal_the_old_way(multiple, precision):
    """Several AdamW steps (grad_accum 2, clipping) from one init: train_step's losses and weights
    equal those of the old logits-then-fp32-cross-entropy step."""
    t = TrainConfig(lr=1e-2, grad_clip=0.5, grad_accum=2, precision=precision)
    ctx = gtrain.autocast_for(t, CPU)
    tokens = ((np.arange(4000) * 7) % V).astype(np.uint16)  # a learnable stream: each token fixes the next
    losses = {}
    models = {}
    for way in ("new", "old"):
        model = padded_model(multiple, seed=5)
        model.train()
        optimizer = gtrain.make_optimizer(model, t)
        batches = Batches(tokens, 4, 16, seed=0, device=CPU)
        params = list(model.parameters())
        step = gtrain.train_step if way == "new" else old_train_step
        losses[way] = [step(model, optimizer, batches.next, t.grad_accum, ctx, t.grad_clip, params).item()
                       for _ in range(5)]
        models[way] = model
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.tensor(losses["new"]), torch.tensor(losses["old"]), **tol)
    assert losses["new"][-1] < losses["new"][0]  # it trains
    for (name, p), q in zip(models["new"].named_parameters(), models["old"].parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# 4. no fp32 copy of the full logits in the compiled step
# ---------------------------------------------------------------------------------------------

def cpu_allocations(fn, trace: Path) -> list[int]:
    """The sizes in bytes of every CPU allocation made while ``fn()`` runs (the profiler's memory
    events come from the allocator itself, so they include the buffers inductor's code allocates)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    doc = json.loads(trace.read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]" and e["args"].get("Bytes", 0) > 0]


@pytest.mark.slow
@pytest.mark.parametrize("multiple", [None, 64])
def test_compiled_bf16_step_allocates_no_fp32_copy_of_the_logits(multiple, tmp_path):
    """bf16 autocast, inductor on CPU: one compiled train_step allocates no float32 tensor of B*T*V
    (or B*T*padded) elements, while the old eager logits.float() step does, under the same detector."""
    B, T, vocab = 4, 16, 389  # a prime vocabulary: no other tensor of the step has a logits-sized byte count
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=vocab, context_length=T, emb_dim=48, n_heads=4, n_layers=1, drop_rate=0.0,
                          vocab_multiple=multiple))
    rows = model.config.padded_vocab
    fp32_logits = {B * T * vocab * 4, B * T * rows * 4}
    bf16_logits = B * T * rows * 2
    t = TrainConfig(precision="bf16")
    ctx = gtrain.autocast_for(t, CPU)
    optimizer = gtrain.make_optimizer(model, t)
    params = list(model.parameters())
    window = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    batch = lambda: (window[:, :-1], window[:, 1:])  # noqa: E731 - real batches are views of one window
    try:
        compiled, note = gtrain.compile_or_fallback(model, (B, T), CPU, ctx)
        assert note == "compiled", note
        gtrain.train_step(compiled, optimizer, batch, 1, ctx, 1.0, params)  # warm: nothing left to compile

        new = cpu_allocations(lambda: gtrain.train_step(compiled, optimizer, batch, 1, ctx, 1.0, params),
                              tmp_path / "new.json")

        def old_step():
            with ctx():
                logits = model(window[:, :-1])
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)

        old = cpu_allocations(old_step, tmp_path / "old.json")
    finally:
        torch._dynamo.reset()
    # the detector sees the compiled step's own buffers (the bf16 logits the head's matmul writes) ...
    assert bf16_logits in new, f"the detector saw no logits-sized buffer of the compiled step: {sorted(new)[-10:]}"
    # ... and flags the old way's fp32 copy
    assert sum(old.count(n) for n in fp32_logits) >= 1, f"control failed: {sorted(old)[-10:]}"
    assert sum(new.count(n) for n in fp32_logits) == 0, \
        f"the compiled step allocated an fp32 logits-sized tensor: {sorted(new)[-10:]}"


# ---------------------------------------------------------------------------------------------
# 5. no recompile after the first step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", builtin_positions())
def test_no_recompile_after_the_first_step(position, monkeypatch):
    """compile_or_fallback's probe compiles once; several steps on real strided batches compile
    nothing more (a contiguous batch, the old probe's layout, does: the counter can see it)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    counter = CompileCounterWithBackend("aot_eager")  # counts graphs; aot_eager keeps it fast
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter))
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = GPTModel(dict(vocab_size=48, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1,
                              position=position)).to(CPU).train()
        t = TrainConfig(lr=1e-3)
        ctx = gtrain.autocast_for(t, CPU)
        optimizer = gtrain.make_optimizer(model, t)
        compiled, note = gtrain.compile_or_fallback(model, (4, 16), CPU, ctx)
        assert note == "compiled", note
        assert counter.frame_count == 1
        tokens = np.random.RandomState(0).randint(0, 48, 3000).astype(np.uint16)
        batches = Batches(tokens, 4, 16, seed=0, device=CPU)
        x, y = batches.next()
        assert not x.is_contiguous()  # the strided views t[:, :-1], t[:, 1:] of real batches
        params = list(model.parameters())
        for _ in range(4):
            loss = gtrain.train_step(compiled, optimizer, batches.next, 1, ctx, 1.0, params)
        assert torch.isfinite(loss)
        assert counter.frame_count == 1, f"{position}: recompiled ({counter.frame_count} graphs)"
        assert counters["stats"]["unique_graphs"] == 1
        assert counters["frames"]["total"] == 1
        assert not counters["graph_break"]

        compiled(x.contiguous(), targets=y.contiguous())  # control: another layout does recompile
        assert counter.frame_count == 2
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# 6. per-device MFU, and no per-step host sync under torchrun
# ---------------------------------------------------------------------------------------------

def tiny_spec(**train):
    doc = {"name": "gpu", "model": TINY, "seeds": [0],
           "train": {"batch_size": 4, "eval_batches": 1, "checkpoint_every": 0, **train}}
    (spec,) = load_experiment(None, cfg=OmegaConf.create(doc)).runs
    return spec


def tiny_data() -> TokenData:
    rs = np.random.RandomState(0)
    return TokenData(rs.randint(0, 48, 4000).astype(np.uint16), rs.randint(0, 48, 600).astype(np.uint16), None)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A real gloo process group of one process (rank 0), destroyed after the test."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield Group(rank=0, world=1, active=True)
    finally:
        dist.destroy_process_group()


def test_no_host_read_back_between_log_steps_under_torchrun(gloo_world_of_one, monkeypatch, tmp_path):
    """train_run in a gloo group (DDP): the steps between log steps read nothing back from the device
    (no .item()/float()/bool(), no stop flag all-reduce); the log steps do; MFU is per device."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils._python_dispatch import TorchDispatchMode

    group = gloo_world_of_one
    steps, every = 8, 4
    spec = tiny_spec(steps=steps, log_every=every, eval_every=every)
    events: list = []
    in_optimizer = [False]

    class ReadBacks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # AdamW on CPU (not fused) reads its step counters in optimizer.step; the fused CUDA
            # AdamW that GPU runs use does not: those reads are the device's, not the loop's
            if func is torch.ops.aten._local_scalar_dense.default and not in_optimizer[0]:
                events.append("read")
            return func(*args, **(kwargs or {}))

    real_step, real_any_rank = gtrain.train_step, gtrain.any_rank

    def counted_step(*args, **kwargs):
        events.append("step")
        return real_step(*args, **kwargs)

    def counted_any_rank(*args, **kwargs):
        events.append("any_rank")
        return real_any_rank(*args, **kwargs)

    PEAK = 1e12
    monkeypatch.setattr(gtrain, "train_step", counted_step)
    monkeypatch.setattr(gtrain, "any_rank", counted_any_rank)
    monkeypatch.setattr(gtrain, "peak_flops", lambda device: PEAK)
    hooks = [register_optimizer_step_pre_hook(lambda opt, a, k: in_optimizer.__setitem__(0, True)),
             register_optimizer_step_post_hook(lambda opt, a, k: in_optimizer.__setitem__(0, False))]
    torch.manual_seed(0)
    model = GPTModel(spec.model)
    rows = []
    try:
        with ReadBacks():
            summary = gtrain.train_run(spec, tiny_data(), model, CPU, rows.append, lambda row: None,
                                       state_dir=tmp_path, group=group)
    finally:
        for hook in hooks:
            hook.remove()

    per_step: dict[int, list] = {}
    step = 0
    for event in events:
        if event == "step":
            step += 1
            per_step[step] = []
        elif step:
            per_step[step].append(event)
    assert sorted(per_step) == list(range(1, steps + 1))
    # step 1 measures the initial gradient norms once (a one-off read); every other step between log steps reads nothing
    for s in range(2, steps + 1):
        if s % every:
            assert per_step[s] == [], f"step {s} synced with the host: {per_step[s]}"
    assert "read" in per_step[every] and per_step[every].count("any_rank") == 1  # the stop is agreed at log steps
    assert "read" in per_step[steps]
    assert [r["step"] for r in rows] == [every, steps]

    assert summary["tokens_per_s"] > 0
    assert summary["tokens_per_s_per_device"] == pytest.approx(summary["tokens_per_s"] / group.world)
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s_per_device"] * summary["flops_per_token"] / PEAK)


PEAK_PLUGIN = '''
import gptlab
import gptlab.train.loop

gptlab.train.loop.peak_flops = lambda device: 1e12  # a known peak, so MFU is reported on CPU


@gptlab.hookimpl
def gptlab_register(register):
    pass
'''


@pytest.mark.slow
def test_mfu_is_per_device_under_a_two_process_torchrun(tmp_path):
    """torchrun with 2 gloo ranks: tokens_per_s counts the job, tokens_per_s_per_device is half of
    it, and MFU is one device's tokens/s against one device's peak."""
    exp = {"name": "ddp", "plugins": ["peak.py"],
           "model": {"preset": "nano", "n_layers": 1, "context_length": 32, "drop_rate": 0.0},
           "train": {"steps": 6, "batch_size": 4, "eval_every": 6, "log_every": 3, "eval_batches": 1,
                     "checkpoint_every": 0},
           "seeds": [0]}
    write_lab(tmp_path, exp, plugins={"peak.py": PEAK_PLUGIN})
    proc = run_subprocess("run", "exp.yaml", "--device", "cpu", cwd=tmp_path, torchrun=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (tmp_path / "results" / "ddp").glob("*__s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["tokens_per_s_per_device"] == pytest.approx(summary["tokens_per_s"] / 2)
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s_per_device"] * summary["flops_per_token"] / 1e12)


# ---------------------------------------------------------------------------------------------
# 7 and 8. checkpoint time apart from training time; resuming across devices
# ---------------------------------------------------------------------------------------------

STEPS = 10
EXPERIMENT = {
    "name": "gpu",
    "model": {"preset": "nano", "n_layers": 1, "context_length": 32, "drop_rate": 0.0},
    "train": {"steps": STEPS, "batch_size": 4, "log_every": 2, "eval_every": STEPS, "eval_batches": 1,
              "checkpoint_every": 2, "checkpoint_keep": 2},
    "seeds": [0],
}


def make_runner(root: Path, should_stop=lambda: False, warn=lambda message: None):
    from gptlab.plugin.manager import build_plugin_system
    from gptlab.run.runner import ExperimentRunner

    path = root / "exp.yaml"
    exp = load_experiment(path if path.exists() else write_lab(root, EXPERIMENT))
    return ExperimentRunner(exp, build_plugin_system(), root / "results", CPU, should_stop=should_stop, warn=warn)


def test_checkpoint_time_is_measured_apart_from_training_time(tmp_path, monkeypatch):
    """Each resumable state takes 0.5 s more to save: summary.json's checkpoint_time_s holds that time,
    and neither train_time_s nor tokens_per_s include it."""
    SLEEP = 0.5
    real_save = gtrain.save
    saved = []

    def slow_save(run_dir, step, *args, **kwargs):
        time.sleep(SLEEP)
        path = real_save(run_dir, step, *args, **kwargs)
        assert (path / "state.json").is_file() and (path / "train.safetensors").is_file()
        saved.append(step)
        return path

    monkeypatch.setattr(gtrain, "save", slow_save)
    (result,) = make_runner(tmp_path).run()
    assert saved == [2, 4, 6, 8]  # every checkpoint_every steps, none after the last step
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    slept = SLEEP * len(saved)
    assert summary["checkpoint_time_s"] >= slept
    assert summary["train_time_s"] < slept, summary  # the 2 s of saving is not training time
    assert summary["wall_time_s"] >= summary["train_time_s"] + summary["checkpoint_time_s"]
    tokens_per_step = EXPERIMENT["train"]["batch_size"] * EXPERIMENT["model"]["context_length"]
    # tokens/s is the timed steps' tokens (all but the first, warm-up step) over the training time alone
    assert summary["tokens_per_s"] * summary["train_time_s"] == pytest.approx((STEPS - 1) * tokens_per_step)


def _interrupt_at(root: Path, step: int) -> Path:
    """Run the experiment until the end of ``step`` (a log step) and stop it there; returns its state."""
    stop = [False]

    def on_progress(spec, state, row):
        stop[0] = row["step"] >= step

    runner = make_runner(root, should_stop=lambda: stop[0])
    with pytest.raises(KeyboardInterrupt):
        runner.run(on_progress=on_progress)
    (run,) = (root / "results" / "gpu").glob("*__s0")
    state = run / "resume" / f"step_{step:08d}"
    assert (state / "state.json").is_file()
    return state


def _as_if_saved_on_cuda(state: Path, device_type_in_json: bool) -> None:
    """Edit a CPU state consistently into one saved on a GPU: a CUDA generator state among the
    tensors, state.json's device_type (or, as older states do, none) and matching sha256s."""
    from safetensors.torch import load_file, save_file

    from gptlab.rundir import file_sha256

    tensors = load_file(str(state / "train.safetensors"))
    assert "rng.cuda" not in tensors
    tensors["rng.cuda"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    save_file(tensors, str(state / "train.safetensors"))
    info = json.loads((state / "state.json").read_text())
    assert info["device_type"] == "cpu"
    if device_type_in_json:
        info["device_type"] = "cuda"
    else:
        del info["device_type"]
    info["sha256"]["train.safetensors"] = file_sha256(state / "train.safetensors")
    (state / "state.json").write_text(json.dumps(info, indent=1, sort_keys=True))


@pytest.mark.parametrize("device_type_in_json", [True, False], ids=["device_type", "rng_only"])
def test_a_state_saved_on_cuda_resumes_on_cpu_with_a_warning(tmp_path, device_type_in_json):
    """A state saved on CUDA (device_type cuda, an rng.cuda tensor) resumes on CPU: the run
    completes from that step, and a warning names both devices."""
    root = tmp_path / "lab"
    state = _interrupt_at(root, 4)
    _as_if_saved_on_cuda(state, device_type_in_json)

    from gptlab.train.resume import latest

    assert latest(state.parent.parent).step == 4  # the edited state verifies: it will be used
    warnings: list[str] = []
    (result,) = make_runner(root, warn=warnings.append).run()
    assert result.action == "resume", result
    assert result.status == "completed" and result.summary["resumed_from"] == [4], result
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    (message,) = [w for w in warnings if "saved on" in w]
    assert "cuda" in message and "cpu" in message and "bit for bit" in message, message


def test_restore_ignores_a_generator_the_state_lacks(tmp_path):
    """restore() of a CPU state with an extra 'cuda' stream in the generators does not raise KeyError:
    the saved streams are restored, the extra one is left as it was."""
    from gptlab.train.resume import latest, restore, save

    torch.manual_seed(0)
    model = GPTModel(TINY)
    t = TrainConfig()
    optimizer = gtrain.make_optimizer(model, t)
    model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward()
    optimizer.step()
    batches = torch.Generator().manual_seed(11)
    counters = {**asdict(gtrain.TrainState(step=1, tokens=4)), "best_val": None}  # as the loop saves them
    save(tmp_path, 1, model, optimizer, {"torch": torch.random.default_generator, "batches": batches},
         {"device_type": "cpu", "metrics_rows": 0, "wall_time_s": 0.0,
          "loop": {"state": counters, "loss_sum": 0.0, "loss_count": 0}}, keep=1)
    saved_batches = batches.get_state()
    found = latest(tmp_path)
    assert "rng.cuda" not in found.tensors

    batches.manual_seed(99)
    extra = torch.Generator().manual_seed(5)
    extra_state = extra.get_state()
    fresh = GPTModel(TINY)
    restore(found, fresh, gtrain.make_optimizer(fresh, t),
            {"torch": torch.random.default_generator, "batches": batches, "cuda": extra})
    assert torch.equal(batches.get_state(), saved_batches)
    assert torch.equal(extra.get_state(), extra_state)
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)
