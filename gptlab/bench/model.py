"""Time one whole model: training steps (eager and compiled) and generation with and without cache.

Training is timed with ``gptlab.train.loop.train_step`` and ``recipe.make_optimizer``, the exact step a
``gptlab run`` takes, so a benchmark figure predicts training speed rather than a lookalike's.
"""
from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..errors import ConfigError, did_you_mean, one_line
from ..fmt import yaml_value
from .timing import (autocast, environment, is_oom, median, milliseconds, peak_memory, quoted, rerun_command,
                     resolve_dtype, short_error, time_calls, torch_threads)


def train_settings(dtype: str, optimizer: Any = "adamw"):
    """gptlab's default TrainConfig (lr, betas, weight decay, clipping) at this precision, with
    ``optimizer``: a registered name or ``{name: ..., option: value}`` (YAML text is parsed)."""
    import yaml

    from ..config.model import ComponentSpec
    from ..config.run import TrainConfig

    if isinstance(optimizer, str) and optimizer.lstrip().startswith("{"):
        try:
            optimizer = yaml.safe_load(optimizer)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--optimizer: not a YAML mapping ({one_line(exc)}); write it as "
                              f"'{{name: muon, momentum: 0.9}}'") from None
    return TrainConfig(precision=dtype, optimizer=ComponentSpec.parse(optimizer, "--optimizer"))


def load_model_config(spec: str, overrides: Iterable[str] = (), plugins: Any = None):
    """A ModelConfig from a preset name or a YAML/JSON file of model keys, plus key=value overrides.

    A file may hold the model keys at its top level or under ``model:`` (an experiment file) and
    may name a ``preset`` that its other keys override, or a ``from_hf`` checkpoint that an importer
    of ``plugins`` (default: the process-wide system) reads. Overrides are written ``n_layers=4``
    or ``model.n_layers=4``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..config.model import ModelConfig
    from ..run.experiment import parse_overrides
    from ..hf.checkpoint import hf_model_config
    from ..config.presets import PRESETS, apply_preset

    path = Path(spec)
    if spec in PRESETS:
        raw: dict = {"preset": spec}
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
    try:
        raw = apply_preset(raw, lambda source: hf_model_config(source, plugins))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    overrides = list(overrides)
    if overrides:
        ov = OmegaConf.to_container(parse_overrides(overrides), resolve=True)
        nested = ov.pop("model", None)
        if isinstance(nested, dict):
            ov = {**ov, **nested}
        try:
            raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(raw), OmegaConf.create(ov)), resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {one_line(exc, 10_000)}") from None
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
                          f"({one_line(exc, 10_000)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model keys, got {type(data).__name__}")
    if isinstance(data.get("model"), dict):
        data = data["model"]
    return dict(data)


def bench_model(config: str, overrides: Iterable[str] = (), *, batch: int = 8, seq_len: Optional[int] = None,
                steps: int = 10, compile: bool = False, gen_tokens: Optional[int] = None, prompt_len: int = 16,
                gen_batch: int = 1, gen_repeats: int = 3, seed: int = 0, warmup: int = 3, device: str = "auto",
                dtype: str = "auto", plugins_dir: Iterable[Path] = (), threads: Optional[int] = None,
                optimizer: str = "adamw") -> dict:
    """Training-step and generation throughput of one model.

    ``config`` is a preset name or a YAML/JSON file (see ``load_model_config``); ``seq_len``
    defaults to the context length, ``gen_tokens`` to min(128, room left after the prompt), 0
    skipping generation; ``compile`` adds a torch.compile'd training row; ``optimizer`` is what
    each step uses (``train_settings``; its step is timed with the rest). Returns the report:
    env, settings, model, command, argv, train and generate rows, failed. A mode that fails or
    runs out of memory is a row with that status, not an exception.
    """
    # long, but one straight assembly of the report (settings, model facts, timed rows): no seam worth a function
    from ..train.devices import peak_flops, resolve_device
    from ..plugin.manager import build_plugin_system

    overrides, plugins_dir = list(overrides), list(plugins_dir)
    with torch_threads(threads):
        plugins = build_plugin_system(plugin_dirs=plugins_dir)
        cfg = load_model_config(config, overrides, plugins)
        t = train_settings(dtype, optimizer)
        try:  # a bad name or option: before anything is timed
            plugins.registry.lookup("optimizer", t.optimizer.name, t.optimizer.options)
        except ConfigError as exc:
            raise ConfigError(f"--optimizer: {exc}") from None
        dev = resolve_device(device)
        dtype = resolve_dtype(dtype, dev)
        seq_len = seq_len or cfg.context_length
        model = _build_model(cfg, plugins, seq_len, seed)
        gen_tokens = _gen_tokens(gen_tokens, prompt_len, model)
        model.to(dev)
        flops = model.flops_per_token(seq_len)
        estimates = {mode: model.memory_estimate(batch, seq_len, dtype="bfloat16" if dtype == "bf16" else "float32",
                                                 compiled=mode == "compiled") for mode in ("eager", "compiled")}
        estimate = estimates["eager"]
        peak = peak_flops(dev)
        settings = {"config": config, "overrides": overrides, "batch": batch, "seq_len": seq_len,
                    "tokens_per_step": batch * seq_len, "steps": steps, "warmup": warmup, "compile": compile,
                    "optimizer": t.optimizer.to_plain(), "gen_tokens": gen_tokens, "prompt_len": prompt_len,
                    "gen_batch": gen_batch, "gen_repeats": gen_repeats, "seed": seed}
        settings.update(lr=t.lr, weight_decay=t.weight_decay, betas=[t.beta1, t.beta2], grad_clip=t.grad_clip)
        info = {"components": dict(model.components), "config": cfg.to_dict(), "parameters": model.num_parameters(),
                "flops_per_token": flops, "peak_flops": peak, "memory_estimate": estimate,
                "memory_estimate_compiled": estimates["compiled"]}

        shared = dict(device=dev, dtype=dtype, t=t, plugins=plugins, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup, seed=seed,
                      flops=flops, peak=peak)
        train_rows = [_time_training(model, "eager", estimate=estimates["eager"], **shared)]
        if compile:
            train_rows.append(_time_training(model, "compiled", estimate=estimates["compiled"], **shared))
        gen_rows = (_time_generation(model, dev, dtype, gen_tokens, prompt_len, gen_batch, gen_repeats, warmup, seed)
                    if gen_tokens else [])
        env = environment(dev, dtype)
    command = ["gptlab", "bench", "model", config, *overrides, "--batch", batch, "--seq-len", seq_len,
               "--steps", steps, "--warmup", warmup, "--device", str(dev), "--dtype", dtype,
               "--gen-tokens", gen_tokens, "--prompt-len", prompt_len, "--gen-batch", gen_batch,
               "--gen-repeats", gen_repeats, "--seed", seed] + (["--compile"] if compile else []) \
        + (["--optimizer", yaml_value(t.optimizer.to_plain())] if t.optimizer.to_plain() != "adamw" else [])
    return {"benchmark": "model", "env": env, "settings": settings, "model": info,
            "command": rerun_command(command, threads, plugins_dir), "argv": quoted(sys.argv),
            "train": train_rows, "generate": gen_rows,
            "failed": any(r["status"].startswith(("failed", "out of memory")) for r in train_rows + gen_rows)}


def _build_model(cfg, plugins, seq_len: int, seed: int):
    """The model, initialised from ``seed``; a ``seq_len`` past what its position encoding can
    encode is refused here, before anything is timed."""
    from ..model.gpt import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(cfg, plugins=plugins)
    if model.max_length is not None and seq_len > model.max_length:
        raise ConfigError(f"--seq-len {seq_len} is longer than position '{model.components['position']}' "
                          f"supports ({model.max_length}); lower it or raise context_length")
    return model


def _gen_tokens(gen_tokens: Optional[int], prompt_len: int, model) -> int:
    """The new tokens per generate call: the asked number, checked against the positions the model
    can encode (past them the KV cache would be dropped and the two modes would time different work)."""
    limit = model.max_length
    if gen_tokens is None:
        room = 128 if limit is None else limit - prompt_len
        if room <= 0:
            raise ConfigError(f"--prompt-len {prompt_len} leaves no room to generate within the model's "
                              f"{limit} positions; lower --prompt-len")
        return min(128, room)
    if gen_tokens and limit is not None and prompt_len + gen_tokens > limit:
        raise ConfigError(f"--prompt-len {prompt_len} + --gen-tokens {gen_tokens} exceeds the "
                          f"{limit} positions position '{model.components['position']}' supports (the KV cache "
                          f"would be dropped); lower one of them")
    return gen_tokens


def _time_training(model, mode: str, *, device: torch.device, dtype: str, t: Any, plugins: Any, batch: int,
                   seq_len: int, steps: int,
                   warmup: int, seed: int, flops: float, peak: Optional[float], estimate: dict) -> dict:
    """One row of the training table: ``mode`` is 'eager' or 'compiled'."""
    from ..train.loop import train_step
    from ..train.recipe import make_optimizer

    row = {"mode": mode, "status": "ok", "step_ms": None, "tokens_per_s": None, "tflops": None, "mfu": None,
           "peak_mem_bytes": None, "est_mem_bytes": estimate["total"], "compile_s": None, "times_ms": None}
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    vocab = model.config.vocab_size
    fixed = (torch.randint(0, vocab, (batch, seq_len), generator=g).to(device),
             torch.randint(0, vocab, (batch, seq_len), generator=g).to(device))
    model.train()
    optimizer = make_optimizer(model, t, plugins)
    try:
        step_model = torch.compile(model) if mode == "compiled" else model
        step = partial(train_step, step_model, optimizer, lambda: fixed, 1, autocast(device, dtype), t.grad_clip,
                       list(model.parameters()))
        if mode == "compiled":  # the first call compiles: timed on its own, apart from the warm-up
            row["compile_s"] = time_calls(step, 1, device)[0]
        for _ in range(warmup):
            step()
        with peak_memory(device) as mem:
            times = time_calls(step, steps, device)
    except Exception as exc:  # noqa: BLE001 - a failed mode is a row, not a crash
        if is_oom(exc):
            row["status"] = "out of memory"
        elif mode == "compiled":
            row["status"] = f"compile failed: {short_error(exc)}"
        else:
            row["status"] = f"failed: {short_error(exc)}"
        return row
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if mode == "compiled":
            _reset_dynamo()
    step_s = median(times)
    row["times_ms"] = milliseconds(times)
    row["step_ms"] = step_s * 1e3
    row["tokens_per_s"] = batch * seq_len / step_s
    row["tflops"] = row["tokens_per_s"] * flops / 1e12
    row["mfu"] = row["tokens_per_s"] * flops / peak if peak else None
    row["peak_mem_bytes"] = mem["peak"]
    return row


def _reset_dynamo() -> None:
    """Forget compiled graphs, so a later benchmark in the same process starts clean."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - best effort
        pass


def _time_generation(model, device: torch.device, dtype: str, gen_tokens: int, prompt_len: int, gen_batch: int,
                     gen_repeats: int, warmup: int, seed: int) -> list[dict]:
    """Greedy generation with and without the KV cache, and whether both produced the same tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    idx = torch.randint(0, model.config.vocab_size, (gen_batch, prompt_len), generator=g).to(device)
    ctx = autocast(device, dtype)
    rows, outputs = [], {}
    for use_cache in (True, False):
        row = {"mode": "kv cache" if use_cache else "no cache", "use_cache": use_cache, "status": "ok",
               "new_tokens": gen_tokens, "prompt_len": prompt_len, "batch": gen_batch, "tokens_per_s": None,
               "ms_per_token": None, "times_ms": None, "same_tokens_as_cache": None}

        def run(n: int = gen_tokens, keep: bool = False) -> None:
            with ctx():
                out = model.generate(idx, n, temperature=0, use_cache=use_cache)
            if keep:
                outputs[use_cache] = out

        try:
            for _ in range(max(1, min(warmup, 2))):
                run(min(8, gen_tokens))
            times = time_calls(run, gen_repeats, device)
            run(keep=True)
        except Exception as exc:  # noqa: BLE001
            row["status"] = "out of memory" if is_oom(exc) else f"failed: {short_error(exc)}"
            rows.append(row)
            continue
        s = median(times)
        row["times_ms"] = milliseconds(times)
        row["tokens_per_s"] = gen_batch * gen_tokens / s
        row["ms_per_token"] = s * 1e3 / gen_tokens
        rows.append(row)
    if True in outputs and False in outputs:
        same = bool(torch.equal(outputs[True], outputs[False]))
        for r in rows:
            r["same_tokens_as_cache"] = same
    return rows
