"""How the package is laid out, in three numbers: module files under gptlab/, the longest chain of
gptlab imports (every import statement, function-level ones included, read from the source), and
how many gptlab modules ``gptlab run EXPERIMENT --dry-run`` imports.

    python benchmarks/layout_stats.py [experiments/preln_vs_postln.yaml]
"""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "gptlab").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, mods: dict[str, Path]) -> set[str]:
    """The gptlab modules ``name`` imports anywhere in its source."""
    path = mods[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in mods and c != name}
    return found


def longest_chain(mods: dict[str, Path]) -> list[str]:
    graph = {m: imports(m, mods) for m in mods}

    @functools.lru_cache(maxsize=None)
    def longest(m: str, seen: frozenset) -> tuple:
        best = (m,)
        for dep in graph[m] - seen:
            path = (m,) + longest(dep, seen | {m})
            best = path if len(path) > len(best) else best
        return best

    return list(max((longest(m, frozenset()) for m in mods if m != "gptlab"), key=len))


def dry_run_imports(experiment: str) -> int:
    code = ("import runpy, sys\nsys.argv = ['gptlab', 'run', %r, '--dry-run']\n"
            "try:\n    runpy.run_module('gptlab', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(len([m for m in sys.modules if m == 'gptlab' or m.startswith('gptlab.')]), file=sys.stderr)"
            % experiment)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return int(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    experiment = sys.argv[1] if len(sys.argv) > 1 else "experiments/preln_vs_postln.yaml"
    mods = modules()
    chain = longest_chain(mods)
    print(f"module files under gptlab/: {len(mods)}")
    print(f"longest import chain: {len(chain)} modules: {' -> '.join(chain)}")
    print(f"gptlab modules imported by `gptlab run {experiment} --dry-run`: {dry_run_imports(experiment)}")


if __name__ == "__main__":
    main()
