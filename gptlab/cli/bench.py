"""``gptlab bench``: wired to gptlab.bench until the benchmark library is split out."""
from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from ..bench import add_parser, cmd_bench

    add_parser(sub).set_defaults(handler=cmd_bench)
