"""The README tutorial's part 3 (an auxiliary loss), followed as written in a copy of the checkout:
the plugin and experiment are read from README.md, the commands run, the figures it quotes checked."""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def part3() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("### Part 3: an auxiliary loss")
    return text[start:text.index("\n## ", start)]


def test_the_aux_loss_tutorial_runs_as_written(tmp_path):
    text = part3()
    plugin = re.search(r"```python\n(# (plugins/\S+\.py)\n.*?)```", text, re.S)
    experiment = re.search(r"```yaml\n(# (\S+\.yaml)\n.*?)```", text, re.S)
    (tmp_path / "plugins").mkdir()
    (tmp_path / plugin[2]).write_text(plugin[1])
    (tmp_path / experiment[2]).write_text(experiment[1])
    commands = [shlex.split(line, comments=True) for line in re.search(r"```bash\n(.*?)```", text, re.S)[1]
                .splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["gptlab", "run"], ["gptlab", "show"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100", PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-m", "gptlab", *commands[0][1:]], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (sparse,) = glob.glob(str(tmp_path / commands[1][2]))  # the shell's glob, as the README writes it
    rows = [json.loads(line) for line in (Path(sparse) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux/l1_hidden"] > 0 for r in rows)
    assert f"{rows[-1]['aux/l1_hidden']:.3f}" == re.search(r"\((\d\.\d+) at step 150 for seed 0", text)[1]
    for relu in glob.glob(str(tmp_path / "results" / "sparse_mlp" / "relu__*")):
        assert not any("aux/" in key for line in (Path(relu) / "metrics.jsonl").read_text().splitlines()
                       for key in json.loads(line))
    show = subprocess.run([sys.executable, "-m", "gptlab", "show", sparse], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)
    quoted = re.search(r'ends with "(aux l1_hidden\s+[\d.]+)"', text)[1]
    assert show.returncode == 0 and quoted.split() == [line for line in show.stdout.splitlines()
                                                       if line.startswith("aux l1_hidden")][0].split()
