"""``gptlab generate``: sample text from a run's checkpoint."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("generate", parents=[common], help="sample text from a run's checkpoint")
    g.add_argument("run_dir", type=Path, help="run directory holding model.safetensors")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=100, help="default: 100")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--plugins-dir", type=Path, action="append", default=[],
                   help="extra plugin folder, for runs built with components from outside ./plugins")
    g.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..config.model import parse_section
    from ..data.tokens import build_tokenizer
    from ..train.devices import resolve_device
    from ..model.gpt import GPTModel
    from ..plugin.manager import build_plugin_system
    from ..rundir import CONFIG, TOKENIZER, read_config, read_json
    from ..config.run import DataConfig

    run_dir = Path(args.run_dir)
    _check_sampling(args)
    plugins = build_plugin_system(plugin_dirs=args.plugins_dir)
    model = GPTModel.from_run(run_dir, plugins)  # checks the folder, its config and its checkpoint
    if not (run_dir / TOKENIZER).is_file():
        raise ConfigError(f"{run_dir} has no tokenizer.json; rerun with train.checkpoint=true to save both")
    try:
        data = parse_section(DataConfig, read_config(run_dir).get("data"), "data")
    except ConfigError as exc:
        raise ConfigError(f"{run_dir / CONFIG}: {exc}") from None
    saved = read_json(run_dir / TOKENIZER)
    if saved is None or not isinstance(saved.get("state", {}), dict):
        raise ConfigError(f"{run_dir / TOKENIZER}: not the tokenizer state gptlab writes; rerun with "
                          f"train.checkpoint=true to write it again")
    try:
        tokenizer = build_tokenizer(data.tokenizer, plugins, saved.get("state"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{run_dir / TOKENIZER}: cannot restore the tokenizer from it ({type(exc).__name__})") from None
    device = resolve_device(args.device)
    model.to(device)

    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens; give some text")
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(torch.tensor([ids], dtype=torch.long, device=device), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    # The model's vocabulary may be padded past the tokenizer's; those ids decode to nothing.
    tokens = [t for t in out[0].tolist() if t < tokenizer.vocab_size]
    sys.stdout.write(tokenizer.decode(tokens) + "\n")
    return 0


def _check_sampling(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise ConfigError("--prompt is empty; give some text to continue")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")

