"""The README's plugin tutorial, followed as written inside a copy of the checkout.

The plugin file and the commands are read from README.md, so the tutorial and this test cannot
drift apart. The user's file lands in the checkout's own plugins/ folder, next to the built-ins:
it must be reported as the user's plugin, and the tests that inspect the built-ins folder must
still pass with it there. (The installed-wheel path is covered in project/test_packaging.py.)
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptlab.builtin_plugins import BUILTINS

from helpers import REPO_ROOT, cli_env, run_subprocess


def tutorial_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("## Tutorial: write a new attention plugin")
    return text[start:text.index("\n## ", start + 1)]


def tutorial_plugin() -> tuple[str, str]:
    """(relative path, source) of the tutorial's plugin file."""
    block = re.search(r"```python\n(# (plugins/\S+\.py)\n.*?)```", tutorial_section(), re.S)
    return block[2], block[1]


def tutorial_experiment() -> tuple[str, str]:
    """(file name, YAML) of the tutorial's experiment."""
    block = re.search(r"```yaml\n(# (\S+\.yaml)\n.*?)```", tutorial_section(), re.S)
    return block[2], block[1]


def tutorial_table() -> list[str]:
    """The table rows the README shows after the run (header, rule, one line per variant)."""
    block = re.search(r"```\n(variant .*?)```", tutorial_section(), re.S)[1]
    return block.splitlines()


def tutorial_commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", tutorial_section(), re.S)[1]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def copy_checkout(dst: Path) -> Path:
    """The repository's files (no venv, results, caches, or untracked user plugins)."""
    shutil.copytree(REPO_ROOT, dst, ignore=shutil.ignore_patterns(
        ".venv", "results", ".git", "__pycache__", ".pytest_cache", "build", "dist", "*.egg-info"))
    for path in (dst / "plugins").glob("*.py"):
        if path.stem not in BUILTINS and path.name != "__init__.py":
            path.unlink()
    (dst / "results").mkdir()
    return dst


def gptlab(argv: list[str], checkout: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``gptlab ARGS`` (as the README writes it) run from the checkout, importing the checkout's code."""
    assert argv[0] == "gptlab"
    return run_subprocess(*argv[1:], cwd=checkout, env={"PYTHONPATH": str(checkout), **env}, timeout=timeout)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = copy_checkout(tmp_path_factory.mktemp("tutorial") / "gptlab")
    rel, source = tutorial_plugin()
    (root / rel).write_text(source)
    name, experiment = tutorial_experiment()
    (root / name).write_text(experiment)
    return root


def test_the_plugin_is_listed_as_the_users(checkout):
    listed = json.loads(gptlab(["gptlab", "components", "attention", "--json"], checkout).stdout)
    mine = [r for r in listed if r["name"] == "my_attention"]
    assert len(mine) == 1 and mine[0]["plugin"] == "my_attention"
    assert mine[0]["doc"] == "Causal attention whose scores are scaled by a learned per-head temperature."
    plugins = {p["name"]: p for p in json.loads(gptlab(["gptlab", "plugins", "--json"], checkout).stdout)}
    assert plugins["my_attention"]["source"] == "plugins-dir"
    assert plugins["my_attention"]["location"] == str(checkout / "plugins" / "my_attention.py")
    assert {n for n, p in plugins.items() if p["source"] == "builtin"} == set(BUILTINS)


def test_the_tutorial_commands_run_as_written(checkout):
    commands = tutorial_commands()
    assert [c[:2] for c in commands] == [["gptlab", "components"], ["gptlab", "run"]]
    listing = gptlab(commands[0], checkout)
    assert listing.returncode == 0 and "my_attention" in listing.stdout
    run = gptlab(commands[1], checkout, COLUMNS="100")
    assert run.returncode == 0, run.stderr[-2000:]
    runs = sorted((checkout / "results" / "my_attention").glob("*__s*"))
    assert sorted(r.name.split("__")[0] for r in runs) == ["default", "default", "tempered", "tempered"]
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert summary["status"] == "completed" and summary["step"] == 150
        tempered = run_dir.name.startswith("tempered")
        assert config["model"]["attention"] == ("my_attention" if tempered else "sdpa")
        assert summary["plugins"]["my_attention"].startswith("plugins-dir sha256:")
    # the table the README shows is the one printed right after the runs: the same header and rows,
    # the same losses (one thread per run, as there); only the wall times may differ
    printed = run.stdout.splitlines()
    shown = tutorial_table()
    assert printed[:2] == shown[:2]
    for row in shown[2:]:
        (mine,) = [line for line in printed if line.split()[:1] == row.split()[:1]]
        assert mine.rsplit(None, 1)[0] == row.rsplit(None, 1)[0]


def test_the_python_snippet_builds_the_model(checkout):
    snippet = re.search(r"In Python the plugin is `(GPTModel\(.*?\))`", tutorial_section())[1]
    probe = (f"import gptlab, torch\nfrom gptlab import GPTModel\nmodel = {snippet}\n"
             "print(type(model.blocks[0].attn).__name__, model(torch.zeros(1, 8, dtype=torch.long)).shape[-1])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=checkout, env=cli_env(PYTHONPATH=str(checkout)),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["TemperedAttention", "256"]


def test_the_plugin_folder_snippet_works_from_anywhere(checkout, tmp_path):
    """The README's "plugin folder from Python" code, run from a directory with no plugins/."""
    section = (REPO_ROOT / "README.md").read_text().split("### Your plugin folder from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    shutil.copy(checkout / "plugins" / "my_attention.py", folder / "my_attention.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = code.replace("path/to/my_plugins", str(folder))
    probe = code + "print(type(model.blocks[0].attn).__name__)\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=cli_env(PYTHONPATH=str(checkout)),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'my_attention'" in out.stdout.splitlines()[0]
    assert out.stdout.splitlines()[-1] == "TemperedAttention"


def test_builtin_folder_tests_pass_with_the_plugin_present(checkout):
    """The tests that look at plugins/ itself, run inside the checkout holding the user's file."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/plugin/test_plugins.py"], cwd=checkout, env=cli_env(PYTHONPATH=str(checkout)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (checkout / "plugins" / "my_attention.py").is_file()


# ---------------------------------------------------------------------------------------------
# Part 2: an optimizer plugin
# ---------------------------------------------------------------------------------------------
def part2() -> str:
    section = tutorial_section()
    return section[section.index("### Part 2: your own optimizer"):]


def test_the_optimizer_plugin_runs_as_written_and_gives_the_table_shown(tmp_path):
    root = copy_checkout(tmp_path / "gptlab")
    text = part2()
    plugin = re.search(r"```python\n(# (plugins/\S+\.py)\n.*?)```", text, re.S)
    experiment = re.search(r"```yaml\n(# (\S+\.yaml)\n.*?)```", text, re.S)
    (root / plugin[2]).write_text(plugin[1])
    (root / experiment[2]).write_text(experiment[1])
    (command,) = [shlex.split(line, comments=True) for line in re.search(r"```bash\n(.*?)```", text, re.S)[1]
                  .splitlines() if line.strip()]
    assert command == ["gptlab", "run", experiment[2]]
    run = gptlab(command, root, COLUMNS="100")
    assert run.returncode == 0, run.stderr[-2000:]
    runs = sorted((root / "results" / "my_optimizer").glob("signum__*"))
    assert len(runs) == 2
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["plugins"]["my_optimizer"].startswith("plugins-dir")
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["optimizer"] == "signum"
    shown = re.search(r"```\n(variant .*?)```", text, re.S)[1].splitlines()
    printed = run.stdout.splitlines()
    assert printed[:2] == shown[:2]
    for row in shown[2:]:
        (mine,) = [line for line in printed if line.split()[:1] == row.split()[:1]]
        assert mine == row  # the columns shown hold no timing: every number must match
    # the option's annotation is enforced before anything trains, in one line
    bad = gptlab(["gptlab", "run", experiment[2], "--dry-run", "train.optimizer={name: signum, momentum: 1.5}"],
                 root, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "optimizer 'signum' option momentum must be a number >= 0 and < 1, got 1.5" in bad.stderr
