"""The package's layers: imports go one way, down, and form no cycle (function-level imports included).

Each gptlab module belongs to one layer; a module may import its own layer and those below it,
never one above. A new package must be given a layer here, so the layout stays a decision.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "gptlab"

#: bottom to top; a module imports only from its own row and the rows before it
LAYERS = [
    ("gptlab.errors", "gptlab.fmt", "gptlab.files", "gptlab.rundir"),  # shared: errors, formatting, safe files, the run folder
    ("gptlab.plugin",),  # the contract: kinds, hooks, registry, plugin system, base classes
    ("gptlab.config",),  # the model config, run sections, presets
    ("gptlab.hf", "gptlab.data"),  # checkpoints in and out; corpora, tokenizers, token caches
    ("gptlab.model",),  # the skeleton
    ("gptlab.train",),  # one run's loop, resumable state, devices, process groups
    ("gptlab.results",),  # run folders read back: tables, statistics, plots, reports
    ("gptlab.run",),  # experiments, the runner, tracking, executors
    ("gptlab.cli", "gptlab.bench"),  # the commands
]
#: the facade: ``gptlab`` re-exports the public names (lazily) and ``python -m gptlab`` starts the CLI
FACADE = {"gptlab", "gptlab.__main__"}
#: executors sit above the runner: it receives them, never imports them
RUNNER, EXECUTORS = "gptlab.run.runner", {"gptlab.run.workers", "gptlab.run.launch", "gptlab.run.jobs"}


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(name: str, path: Path, is_package: bool, known: set) -> set[str]:
    """Every gptlab module ``name`` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, pkg, known) for name, (path, pkg) in found.items()}


def layer_of(module: str):
    for index, row in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in row):
            return index
    return None


def test_every_module_has_a_layer():
    loose = [m for m in modules() if m not in FACADE and layer_of(m) is None]
    assert loose == [], f"give these a layer in tests/project/test_layers.py: {loose}"


def test_no_module_imports_a_layer_above_it():
    upward = [f"{m} -> {d}" for m, deps in graph().items() if m not in FACADE
              for d in deps if d not in FACADE and layer_of(d) > layer_of(m)]
    assert upward == []


def test_nothing_below_the_facade_imports_the_facades_lazy_names():
    """``from gptlab import GPTModel`` inside the package would hide an import of any layer."""
    import gptlab

    offenders = []
    for name, (path, is_package) in modules().items():
        if name in FACADE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_package else name.split(".")[:-1]
                target = node.module if not node.level else ".".join(
                    base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                lazy = sorted({a.name for a in node.names} & set(gptlab._LAZY)) if target == "gptlab" else []
                if lazy:
                    offenders.append(f"{name}: {lazy}")
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_runner_imports_no_executor():
    assert RUNNER in graph() and not graph()[RUNNER] & EXECUTORS


@pytest.mark.parametrize("source, expected", [
    ("from ..model.gpt import GPTModel", {"gptlab.model.gpt"}),  # a relative import, two levels up
    ("def f():\n    from ..run import runner\n", {"gptlab.run.runner"}),  # inside a function, a submodule
    ("import gptlab.results.frame as f", {"gptlab.results.frame"}),
])
def test_the_import_reader_sees_each_form(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = set(modules())
    assert imports("gptlab.plugin.probe", path, False, known) == expected
    assert layer_of("gptlab.plugin.probe") < layer_of(next(iter(expected)))  # each of these would be refused
