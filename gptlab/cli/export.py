"""``gptlab export``: a trained run as a checkpoint another library loads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FORMATS = ("hf",)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser("export", parents=[common],
                       help="write a run's trained model as a Hugging Face checkpoint (transformers loads it)")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory holding model.safetensors")
    e.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new (or empty) directory to write")
    e.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: config.json + model.safetensors of the family the run's components map to")
    e.add_argument("--plugins-dir", type=Path, action="append", default=[],
                   help="extra plugin folder (a user importer that exports, or the run's own components)")
    e.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory; pick a new OUT_DIR "
                          f"(nothing there is overwritten)")
    from ..model import GPTModel
    from ..plugin_manager import build_plugin_system

    plugins = build_plugin_system(plugin_dirs=args.plugins_dir)
    model = GPTModel.from_run(args.run_dir, plugins)
    created = not out.exists()
    try:
        family = model.save_hf(out, plugins)
    except ConfigError as exc:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise ConfigError(f"{args.run_dir}: cannot export: {exc}") from None
    sys.stdout.write(f"wrote {out} ({family}): load it with "
                     f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n")
    return 0
