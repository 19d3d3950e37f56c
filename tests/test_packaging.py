"""The built-in plugins ship inside the wheel (as gptlab.builtin_plugins) and load from an install."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, gptlab
from gptlab.plugin_manager import build_plugin_system
system = build_plugin_system()
model = gptlab.GPTModel({**gptlab.PRESETS["nano"], "position": "rope", "activation": "swiglu"}, plugins=system)
print(json.dumps({"file": gptlab.__file__,
                  "plugins": sorted((p.name, p.source) for p in system.plugins),
                  "params": model.num_parameters()}))
"""


def _tracked_plugins() -> set[str]:
    """The plugin files git tracks (a checkout may hold a user's own extra ones)."""
    out = subprocess.run(["git", "ls-files", "plugins"], cwd=REPO, capture_output=True, text=True)
    names = {Path(line).name for line in out.stdout.split() if line.endswith(".py")}
    return names or {p.name for p in (REPO / "plugins").glob("*.py")}


def test_wheel_carries_builtin_plugins_and_they_load(tmp_path):
    # build from a copy of the tracked layout: a stale build/ or a user's extra plugin must not leak in
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", ".venv", "results", ".git", "__pycache__", ".pytest_cache"))
    for extra in set(p.name for p in (src / "plugins").glob("*.py")) - _tracked_plugins():
        (src / "plugins" / extra).unlink()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("gptlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("gptlab/builtin_plugins/") and n.endswith(".py"))
    expected = sorted(_tracked_plugins())
    assert shipped == expected

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    workdir = tmp_path / "elsewhere"  # no ./plugins here: only the installed built-ins
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=workdir, env=env, check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(site.resolve())
    loaded = {name for name, source in info["plugins"] if source == "builtin"}
    assert loaded == {Path(n).stem for n in expected if n != "__init__.py"}
    assert info["params"] > 0
