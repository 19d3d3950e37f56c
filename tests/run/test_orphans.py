"""A writer killed mid-write leaves a ``.NAME.tmpPID`` file; the next plain ``gptlab run`` on that
folder removes every one whose process is gone (token cache, experiment.json, a summary.json
rewritten under --force) and keeps a live writer's."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import cli_env, pre_vs_post, run_cli, write_lab

EXP = pre_vs_post(steps=2, batch_size=2, eval_every=2, log_every=2, eval_batches=1)


def crash_while_replacing(root: Path, pattern: str, *argv: str) -> subprocess.CompletedProcess:
    """``gptlab ARGV`` in a subprocess that dies (os._exit) at the moment it would move a temporary
    named like ``pattern`` into place: the file is fully written and never renamed, as after a kill."""
    code = textwrap.dedent(f"""
        import os, sys
        real = os.replace
        def replace(src, dst, *a, **k):
            if {pattern!r} in os.path.basename(str(src)):
                os._exit(9)
            return real(src, dst, *a, **k)
        os.replace = replace
        from gptlab.cli import main
        sys.exit(main({list(argv)!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


def temporaries(results: Path) -> list[Path]:
    return sorted(p for p in results.rglob(".*.tmp*"))


@pytest.mark.parametrize("pattern, extra", [(".bin.tmp", ()), (".json.tmp", ()), ("experiment.json.tmp", ()),
                                            ("summary.json.tmp", ("--force",))])
def test_a_plain_run_after_a_crash_leaves_no_temporary(capsys, tmp_path, pattern, extra):
    path = write_lab(tmp_path, EXP)
    results = tmp_path / "results"
    if extra:  # a finished experiment, then a crash while --force rewrites a summary
        assert run_cli(capsys, "run", path, "--results-dir", results, "--device", "cpu", "--quiet")[0] == 0
    proc = crash_while_replacing(tmp_path, pattern, "run", "exp.yaml", "--results-dir", "results", "--device", "cpu",
                                 "--quiet", *extra)
    assert proc.returncode == 9, proc.stderr[-2000:]
    left = temporaries(results)
    assert left and all(pattern in p.name for p in left), left  # the crash left its temporary
    rc, out, err = run_cli(capsys, "run", path, "--results-dir", results, "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert temporaries(results) == []
    assert "Δ vs a" in out  # and the experiment is whole


def test_a_live_writers_temporary_is_kept(capsys, tmp_path):
    path = write_lab(tmp_path, EXP)
    results = tmp_path / "results"
    assert run_cli(capsys, "run", path, "--results-dir", results, "--device", "cpu", "--quiet")[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    run_dir = next(p for p in (results / "tiny").iterdir() if p.is_dir())
    live = [results / ".cache" / "tokens" / f".x.bin.tmp{1}",  # pid 1 is always alive
            results / "tiny" / f".experiment.json.tmp{1}"]
    gone = [results / ".cache" / "tokens" / f".x.bin.tmp{dead_pid}", results / "tiny" / f".experiment.json.tmp{dead_pid}",
            run_dir / f".summary.json.tmp{dead_pid}"]
    for p in live + gone:
        p.write_text("half")
    outside = tmp_path / "keep.txt"
    outside.write_text("mine")
    link = results / "tiny" / f".planted.json.tmp{dead_pid}"
    link.symlink_to(outside)
    assert run_cli(capsys, "run", path, "--results-dir", results, "--device", "cpu", "--quiet")[0] == 0
    assert all(p.exists() for p in live) and not any(p.exists() for p in gone)
    assert not link.is_symlink() and outside.read_text() == "mine"  # the link went, not its target
