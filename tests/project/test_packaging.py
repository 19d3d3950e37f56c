"""The built-in plugins ship inside the wheel (as gptlab.builtin_plugins) and load from an install,
and the README tutorial's plugin works there as the user's own."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO_ROOT, imported_modules, run_subprocess

PROBE = """
import json, gptlab
from gptlab.plugin.manager import build_plugin_system
system = build_plugin_system()
model = gptlab.GPTModel({**gptlab.PRESETS["nano"], "position": "rope", "activation": "swiglu"}, plugins=system)
mine = gptlab.GPTModel({**gptlab.PRESETS["nano"], "attention": "my_attention"}, plugins=system)
print(json.dumps({"file": gptlab.__file__,
                  "plugins": sorted((p.name, p.source) for p in system.plugins),
                  "params": model.num_parameters(), "mine": type(mine.blocks[0].attn).__name__}))
"""

BUILTINS = __import__("gptlab.builtin_plugins", fromlist=["BUILTINS"]).BUILTINS


def _shipped_plugins() -> set[str]:
    """The built-in plugin files (a checkout may hold a user's own extra ones)."""
    return {f"{stem}.py" for stem in BUILTINS} | {"__init__.py"}


def test_wheel_carries_builtin_plugins_and_they_load(tmp_path):
    # build from a copy of the tracked layout: a stale build/ or a user's extra plugin must not leak in
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("build", "dist", "*.egg-info", ".venv", ".git", "__pycache__", ".pytest_cache")
    # the results folder of runs, not the gptlab.results package
    shutil.copytree(REPO_ROOT, src, ignore=lambda folder, names: set(skip(folder, names)) | (
        {"results"} if Path(folder).resolve() == REPO_ROOT.resolve() else set()))
    for extra in set(p.name for p in (src / "plugins").glob("*.py")) - _shipped_plugins():
        (src / "plugins" / extra).unlink()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("gptlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("gptlab/builtin_plugins/") and n.endswith(".py"))
    expected = sorted(_shipped_plugins())
    assert shipped == expected
    assert "gptlab/builtin_plugins/manifest.json" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    workdir = tmp_path / "elsewhere"  # a user's folder: ./plugins holds only the tutorial's plugin
    (workdir / "plugins").mkdir(parents=True)
    readme = (REPO_ROOT / "README.md").read_text()
    tutorial = re.search(r"```python\n(# plugins/my_attention\.py\n.*?)```", readme, re.S)[1]
    (workdir / "plugins" / "my_attention.py").write_text(tutorial)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=workdir, env=env, check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(site.resolve())
    loaded = {name for name, source in info["plugins"] if source == "builtin"}
    assert loaded == set(BUILTINS)
    assert [p for p in info["plugins"] if p[1] != "builtin"] == [["my_attention", "plugins-dir"]]
    assert info["params"] > 0 and info["mine"] == "TemperedAttention"
    # the listing commands work from the install too, without importing torch for the built-ins
    listed = run_subprocess("components", "position", "--json", cwd=tmp_path, env={"PYTHONPATH": str(site)},
                            flags=("-X", "importtime"))
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert {r["name"] for r in json.loads(listed.stdout)} == {"learned", "sinusoidal", "rope", "alibi", "none"}
    assert "torch" not in imported_modules(listed.stderr)  # -X importtime names every module imported
