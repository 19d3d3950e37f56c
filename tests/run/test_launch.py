"""``gptlab run --launcher local|slurm`` and ``gptlab status``, with the real submitit.

The local launcher sends each pending run through submitit's local executor as its own
subprocess, by the same code the Slurm launcher uses; these tests check that it trains exactly
what the in-process runner trains, that ``--no-wait`` and ``gptlab status`` follow it, that a
requeue resumes the run, and that every way of asking for something impossible is one line and
exit status 2 with nothing written.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import HOLD_PLUGIN, held, hold, pre_vs_post, release, run_cli, wait_for, write_lab

EXP = pre_vs_post(steps=6, batch_size=2, eval_every=3, log_every=3, eval_batches=1)
KEYS = ("step", "tokens", "train_loss", "val_loss", "lr")


@contextmanager
def inside(folder: Path):
    """Work from ``folder`` (module fixtures run before conftest's per-test empty folder)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def outcome(exp_dir: Path) -> dict:
    """Per run directory: its metrics rows (the keys that must match) and final losses."""
    out = {}
    for run_dir in sorted(p for p in exp_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        out[run_dir.name] = ([{k: row.get(k) for k in KEYS} for row in rows],
                             summary["status"], summary["final_train_loss"], summary["final_val_loss"])
    return out


def status_rows(capsys, exp_dir: Path) -> list[dict]:
    """``gptlab status EXP_DIR --json``, through the command's own parser and handler."""
    from gptlab.cli import Parser, common_options
    from gptlab.cli import status

    parser = Parser(prog="gptlab")
    status.add_parsers(parser.add_subparsers(dest="command", parser_class=Parser), common_options())
    args = parser.parse_args(["status", str(exp_dir), "--json"])
    capsys.readouterr()
    assert args.handler(args) == 0
    return json.loads(capsys.readouterr().out)


def submissions(exp_dir: Path) -> list[dict]:
    return json.loads((exp_dir / ".submitit" / "jobs.json").read_text())["submissions"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = write_lab(tmp_path_factory.mktemp("launch"), EXP, plugins={"hold.py": HOLD_PLUGIN}).parent
    write_lab(root, {**EXP, "plugins": ["hold.py"], "variants": {"a": {}}}, "requeue.yaml")
    return root


@pytest.fixture(scope="module")
def inprocess(lab) -> Path:
    with inside(lab):
        assert run_cli(None, "run", "exp.yaml", "--device", "cpu", "--threads", "1", "--results-dir", "inprocess",
                       "--quiet")[0] == 0
    return lab / "inprocess" / "tiny"


@pytest.fixture(scope="module")
def local(lab) -> Path:
    with inside(lab):
        assert run_cli(None, "run", "exp.yaml", "--device", "cpu", "--threads", "1", "--results-dir", "local",
                       "--launcher", "local", "--quiet")[0] == 0
    return lab / "local" / "tiny"


def test_local_launcher_trains_what_the_inprocess_runner_trains(inprocess, local):
    expected = outcome(inprocess)
    assert len(expected) == 2 and all(status == "completed" for _, status, *_ in expected.values())
    assert outcome(local) == expected


def test_rerun_with_the_local_launcher_submits_nothing_for_finished_runs(lab, local, capsys):
    before = {p.name: (p / "summary.json").read_bytes() for p in local.iterdir() if p.name.endswith("s0")}
    with inside(lab):
        rc, _, err = run_cli(capsys, "run", "exp.yaml", "--device", "cpu", "--threads", "1", "--results-dir", "local",
                             "--launcher", "local")
    assert (rc, len(submissions(local)), "nothing to train (2 finished runs kept)" in err) == (0, 1, True)
    assert {p.name: (p / "summary.json").read_bytes() for p in local.iterdir() if p.name.endswith("s0")} == before


def test_no_wait_returns_at_once_and_status_follows_the_runs_to_the_end(lab, capsys):
    with inside(lab):
        rc, out, _ = run_cli(capsys, "run", "exp.yaml", "--device", "cpu", "--threads", "1", "--results-dir", "nowait",
                             "--launcher", "local", "--no-wait")
    exp_dir = lab / "nowait" / "tiny"
    assert rc == 0 and f"gptlab status {Path('nowait') / 'tiny'}" in out
    jobs = {name: run["job_id"] for name, run in submissions(exp_dir)[0]["runs"].items()}
    first = status_rows(capsys, exp_dir)  # the tasks are still importing torch: no run has started
    assert {(Path(r["run_dir"]).name, r["job_id"], r["status"]) for r in first} == \
        {(name, job, "queued") for name, job in jobs.items()}
    last = wait_for(lambda: (rows := status_rows(capsys, exp_dir)) and
                    all(r["status"] not in ("queued", "running") for r in rows) and rows, what="the runs", interval=0.5)
    assert {(Path(r["run_dir"]).name, r["status"], r["step"], r["steps"]) for r in last} == \
        {(name, "completed", 6, 6) for name in jobs}


def test_a_task_signalled_before_its_time_limit_is_requeued_and_resumes_bit_for_bit(lab, inprocess, capsys):
    hold(lab, 3)
    with inside(lab):
        assert run_cli(capsys, "run", "requeue.yaml", "--device", "cpu", "--threads", "1", "--results-dir", "requeue",
                       "--launcher", "local", "--no-wait")[0] == 0
    exp_dir = lab / "requeue" / "tiny"
    (name,) = submissions(exp_dir)[0]["runs"]
    run_dir = exp_dir / name
    held(lab, timeout=120)  # the task holds inside step 3
    os.kill(json.loads((run_dir / "summary.json").read_text())["pid"], signal.SIGUSR2)
    release(lab)
    wait_for(lambda: all(r["status"] == "completed" for r in status_rows(capsys, exp_dir)), what="the requeue",
             interval=0.5)
    resumed = json.loads((run_dir / "summary.json").read_text())["resumed_from"]
    assert (resumed, outcome(exp_dir)[name]) == ([3], outcome(inprocess)[name])


def fake_slurm(folder: Path, sbatch: str) -> Path:
    """Stand-ins for Slurm's commands: ``sbatch`` runs the given shell lines, ``srun`` is only there to
    be found, ``sacct`` says job 4242's array is pending. submitit itself is real."""
    folder.mkdir()
    for name, text in (("sbatch", sbatch), ("srun", "exit 1"),
                       ("sacct", "echo 'JobID|State|NodeList'; echo '4242_[0-1%2]|PENDING|None assigned'")):
        (folder / name).write_text(f"#!/bin/sh\n{text}\n")
        (folder / name).chmod(0o755)
    return folder


def test_the_slurm_launcher_submits_one_array_with_the_resources_asked_for(lab, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(fake_slurm(tmp_path / "bin", "echo 'Submitted batch job 4242'")))
    rc, out, err = run_cli(capsys, "run", lab / "exp.yaml", "--results-dir", tmp_path / "results",
                           "--launcher", "slurm", "--partition", "gpu", "--gpus-per-run", "1", "--time", "60",
                           "--mem", "32", "--array-parallelism", "8", "--no-wait")
    folder = tmp_path / "results" / "tiny" / ".submitit"
    script = set((folder / "4242_submission.sh").read_text().splitlines())
    asked = {"#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=60",
             "#SBATCH --mem=32GB", "#SBATCH --signal=USR2@90"}
    rows = status_rows(capsys, folder.parent)
    assert (rc, asked - script, sorted((r["variant"], r["status"], r["job_id"], r["job_state"]) for r in rows)) == \
        (0, set(), [("a", "queued", "4242_0", "PENDING"), ("b", "queued", "4242_1", "PENDING")])


def test_a_job_array_sbatch_refuses_is_one_line_naming_its_reason(lab, tmp_path, monkeypatch, capsys):
    refuse = "echo 'sbatch: error: invalid partition specified: gpux' >&2; exit 1"
    monkeypatch.setenv("PATH", str(fake_slurm(tmp_path / "bin", refuse)))
    rc, out, err = run_cli(capsys, "run", lab / "exp.yaml", "--results-dir", tmp_path / "results",
                           "--launcher", "slurm", "--partition", "gpux", "--time", "60")
    assert (rc, err) == (2, "gptlab: error: sbatch refused the job array (sbatch: error: invalid partition specified: "
                            "gpux); check --partition, --gpus-per-run, --time and --mem (or the experiment's slurm: "
                            "section)\n")


@pytest.mark.parametrize("args, message", [
    (["--launcher", "local", "--jobs", "2"], "--jobs applies to --launcher inprocess"),
    (["--partition", "gpu"], "--partition applies to --launcher slurm or local"),
    (["--launcher", "local", "--time", "0"], "slurm.time (--time) must be a positive number of minutes, got 0"),
    (["--launcher", "slurm", "--time", "60"], "Slurm is not available on this machine"),
    (["slurm.partiton=gpu", "--launcher", "local"], "unknown slurm key 'partiton' (did you mean 'partition'?)"),
])
def test_impossible_launcher_requests_are_one_line_and_write_nothing(lab, tmp_path, monkeypatch, capsys, args,
                                                                     message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, whatever the machine running the tests has
    rc, out, err = run_cli(capsys, "run", lab / "exp.yaml", "--results-dir", tmp_path / "results", *args)
    assert (rc, len(err.splitlines()), message in err, (tmp_path / "results").exists()) == (2, 1, True, False)


def test_an_unknown_key_in_the_slurm_section_of_the_file_is_one_line(tmp_path, capsys):
    write_lab(tmp_path, {**EXP, "slurm": {"partition": "gpu", "gpus": 1}})
    rc, out, err = run_cli(capsys, "run", tmp_path / "exp.yaml", "--launcher", "local", "--dry-run")
    assert (rc, err.strip()) == (2, f"gptlab: error: {tmp_path / 'exp.yaml'}: unknown slurm key 'gpus' (did you "
                                     f"mean 'gpus_per_run'?); valid keys: partition, gpus_per_run, time, mem, "
                                     f"array_parallelism")


def test_command_line_flags_override_the_slurm_section():
    from gptlab.run.launch import slurm_settings
    from gptlab.config.run import SlurmConfig

    merged = slurm_settings(SlurmConfig(partition="cpu", time=30, mem=8.0), {"partition": "gpu", "time": None}, "slurm")
    assert (merged.partition, merged.time, merged.mem) == ("gpu", 30, 8.0)


def test_without_submitit_the_launcher_says_what_to_install(lab, tmp_path):
    wrapper = "import sys; sys.modules['submitit'] = None; from gptlab.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", wrapper, "run", str(lab / "exp.yaml"), "--launcher", "local",
                           "--results-dir", str(tmp_path / "results")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr.count("\n"), 'pip install -e ".[slurm]"' in proc.stderr,
            (tmp_path / "results").exists()) == (2, 1, True, False)
