"""``gptlab plugins`` and ``gptlab components``: what is loaded, from where, and what it registers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plugins", parents=[common], help="list loaded plugins, where they came from and their versions")
    c = sub.add_parser("components", parents=[common],
                       help="list registered components with their one-line docs and their options (defaults, types)")
    c.add_argument("kind", nargs="?", help="only this kind (attention, position, norm, ...)")
    for parser, handler in ((p, cmd_plugins), (c, cmd_components)):
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--plugins-dir", type=Path, action="append", default=[], help="extra plugin folder")
        parser.set_defaults(handler=handler)


def _print_table(title: str, columns: tuple, rows: list[tuple]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..plugin.manager import build_plugin_system

    system = build_plugin_system(plugin_dirs=args.plugins_dir, listing=True)
    rows = [{"name": p.name, "source": p.source, "location": p.location, "version": p.version,
             "components": p.components} for p in system.plugins]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(f"{len(rows)} plugins (in load order)", ("name", "source", "version", "registers", "location"),
                 [(r["name"], r["source"], r["version"], ", ".join(r["components"]), r["location"]) for r in rows])
    return 0


def option_text(option: dict) -> str:
    """One option as ``components`` prints it: ``eps=1e-05 (number > 0)``, ``path (required; string or list)``."""
    if option.get("required"):
        return f"{option['name']} (required" + (f"; {option['type']})" if option.get("type") else ")")
    default = option.get("default")
    if isinstance(default, float):
        shown = repr(default)
        shown = shown if len(shown) <= 10 else f"{default:.6g}"
    else:
        shown = json.dumps(default)
    return f"{option['name']}={shown}" + (f" ({option['type']})" if option.get("type") else "")


def cmd_components(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, did_you_mean
    from ..plugin.hookspecs import KINDS
    from ..plugin.manager import build_plugin_system, entry_options

    if args.kind and args.kind not in KINDS:
        raise ConfigError(f"unknown component kind '{args.kind}'{did_you_mean(args.kind, KINDS)}; "
                          f"kinds: {', '.join(KINDS)}")
    system = build_plugin_system(plugin_dirs=args.plugins_dir, listing=True)
    rows = [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "doc": e.doc, "overrides": e.overrides,
             "options": entry_options(e)} for e in system.registry.entries(args.kind)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    def described(row: dict) -> Group:  # the doc line, then one indented line per option (plain text, no markup)
        return Group(*([Text(row["doc"])] if row["doc"] else []),
                     *(Padding(Text(option_text(o)), (0, 0, 0, 2)) for o in row["options"]))

    _print_table("registered components (options: name=default (type))", ("kind", "name", "plugin", "description"),
                 [(r["kind"], r["name"], r["plugin"] + (f" (overrides {r['overrides']})" if r["overrides"] else ""),
                   described(r)) for r in rows])
    return 0
