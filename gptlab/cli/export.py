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


def check_out_dir(out: Path) -> Path:
    """Refuse an OUT_DIR that cannot work, in one line naming it, before anything is read or
    written: a planted link (to a folder, or to nothing), anything but a new or empty folder, or
    a folder under a kernel file system (/proc, /sys)."""
    from ..rundir import refuse_link

    out = Path(out)
    refuse_link(out)  # as report and show --png refuse the same link: never written through
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory; pick a new OUT_DIR "
                          f"(nothing there is overwritten)")
    real = out.parent.resolve() / out.name
    if real.parts[1:2] in (("proc",), ("sys",)):
        raise ConfigError(f"cannot write {out}: it lies under /{real.parts[1]}, a kernel file system; "
                          f"pick a folder on disk")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    out = check_out_dir(Path(args.out_dir))
    from ..hf.checkpoint import export_hf
    from ..model.gpt import GPTModel
    from ..plugin.manager import build_plugin_system

    plugins = build_plugin_system(plugin_dirs=args.plugins_dir)
    model = GPTModel.from_run(args.run_dir, plugins)
    tokenizer = run_tokenizer(Path(args.run_dir), plugins)  # its end-of-text token is the export's bos/eos
    check_out_dir(out)  # again, right before writing: loading took a while
    made = [p for p in (out, *out.parents) if not p.exists() and not p.is_symlink()][::-1]  # outermost first
    try:
        for folder in made:
            folder.mkdir()  # never through a link: OUT_DIR's was refused above, and mkdir never follows one
    except OSError as exc:
        _remove_empty(made)
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        family = export_hf(model, out, plugins, tokenizer=tokenizer)
    except (ConfigError, OSError) as exc:
        _remove_empty(made)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise ConfigError(f"{args.run_dir}: cannot export: {exc}") from None
    sys.stdout.write(f"wrote {out} ({family}): load it with "
                     f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n")
    return 0


def run_tokenizer(run_dir: Path, plugins: Any) -> Any:
    """The run's tokenizer as it trained (config.yaml's data.tokenizer with tokenizer.json's state),
    or None when the run folder cannot give it back: the export then falls back on the family's
    own special token ids, kept only when they lie inside the model's vocabulary."""
    from ..config.model import parse_section
    from ..config.run import DataConfig
    from ..data.tokens import build_tokenizer
    from ..rundir import TOKENIZER, read_config, read_json

    saved = read_json(run_dir / TOKENIZER)
    if saved is None or not isinstance(saved.get("state", {}), dict):
        return None
    try:
        data = parse_section(DataConfig, read_config(run_dir).get("data"), "data")
        return build_tokenizer(data.tokenizer, plugins, saved.get("state"))
    except Exception:  # a tokenizer that cannot be rebuilt here (tiktoken's vocabulary not cached): not known
        return None


def _remove_empty(made: list) -> None:
    """Remove the folders export created (innermost first) while they are still empty: a refused
    export leaves nothing behind."""
    for folder in reversed(made):
        try:
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
        except OSError:
            return
