"""Files gptlab reads back from a results folder are bounded and type-checked; links are not followed.

Issue 20, part B. Every file gptlab reads back (summary.json, experiment.json, jobs.json, a run's
config.yaml, metrics.jsonl) is read with a size bound, never from a link to /dev/zero or a FIFO,
and its parsed contents are type-checked; YAML aliases are never expanded. Where the file belongs
to one run of many (``runs``, ``compare``, ``show EXP``, ``status``), the run is skipped (or listed
as damaged) with one warning line naming it; where it is the one file a command works on
(``show RUN``, ``export RUN``), it is a one-line error and exit status 2. ``clean`` never deletes
through a symlinked experiment folder, ``export`` never writes through a linked OUT_DIR, and
``status --json`` keeps library warnings off stdout.

Each case runs the command in-process on run folders written by hand (helpers.make_experiment: no
training), checks the exact exit status and stderr line, and hashes the trees around it before and
after: nothing outside the folders named changes (and a read-only command changes nothing at all).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import gptlab.rundir as rd

from helpers import make_experiment, one_line_error, run_cli, run_subprocess, tree_hash


# -- helpers ---------------------------------------------------------------------------------------
def hashes(*roots: Path) -> dict:
    return {str(r): tree_hash(r) for r in roots}


def one_warning(err: str, *words: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: warning:") and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """results/exp with two variants of two seeds each, and a folder "elsewhere" outside it."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    exp = make_experiment(tmp_path / "results", "exp", {"a": [3.0, 3.1], "b": [2.9, 3.0]})
    elsewhere = tmp_path / "elsewhere"
    make_experiment(elsewhere, "theirs", {"x": [1.0]})
    (elsewhere / "precious.txt").write_text("keep me")
    return exp


def run_of(exp: Path, variant: str = "a", seed: int = 0) -> Path:
    (run,) = exp.glob(f"{variant}__*__s{seed}")
    return run


def listed(out: str) -> set:
    return {(r["variant"], r["seed"]) for r in json.loads(out)}


# -- links: clean never deletes through one, export never writes through one ----------------------
def test_clean_never_follows_a_symlinked_experiment_folder(lab, capsys):
    results, elsewhere = lab.parent, lab.parent.parent / "elsewhere"
    (results / "other").symlink_to(elsewhere / "theirs", target_is_directory=True)
    before = hashes(elsewhere)
    rc, out, err = run_cli(capsys, "clean", results, "--status", "completed", "--yes")
    assert rc == 0, err
    one_warning(err, str(results / "other"), "symbolic link")
    assert hashes(elsewhere) == before  # the completed run out there is still there
    assert not list(lab.glob("*__s*"))  # the runs inside the folder named were removed
    assert (results / "other").is_symlink()


def test_clean_keeps_a_symlinked_run_folder_with_a_warning(lab, capsys):
    elsewhere = lab.parent.parent / "elsewhere"
    (lab / "x__hx__s0").symlink_to(run_of(elsewhere / "theirs", "x"), target_is_directory=True)
    before = hashes(elsewhere)
    rc, out, err = run_cli(capsys, "clean", lab, "--status", "completed", "--yes")
    assert rc == 0, err
    one_warning(err, str(lab / "x__hx__s0"), "symbolic link")
    assert hashes(elsewhere) == before and (lab / "x__hx__s0").is_symlink()


@pytest.mark.parametrize("kind", ["link to an empty folder", "dangling link", "under /proc", "through a link to /proc"])
def test_export_refuses_an_out_dir_it_would_write_through(lab, capsys, kind):
    elsewhere = lab.parent.parent / "elsewhere"
    (elsewhere / "empty").mkdir()
    out = lab.parent.parent / "out"
    if kind == "link to an empty folder":
        out.symlink_to(elsewhere / "empty", target_is_directory=True)
    elif kind == "dangling link":
        out.symlink_to(elsewhere / "not-there")
    elif kind == "under /proc":
        out = Path("/proc/gptlab-export-test")
    else:
        (lab.parent.parent / "proc-link").symlink_to("/proc", target_is_directory=True)
        out = lab.parent.parent / "proc-link" / "hf"
    before = hashes(elsewhere, lab.parent)
    rc, _, err = run_cli(capsys, "export", run_of(lab), out, "--format", "hf")
    one_line_error(rc, err, str(out))
    assert hashes(elsewhere, lab.parent) == before
    assert not (elsewhere / "not-there").exists() and not Path("/proc/gptlab-export-test").exists()


# -- read-back: size and type bounds ---------------------------------------------------------------
def plant(run: Path, name: str, kind: str) -> None:
    """Make ``run/name`` a link to /dev/zero, a FIFO, a sparse file just over its limit, or deep JSON."""
    path = run / name
    path.unlink(missing_ok=True)
    if kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "too large":
        limit = rd.MAX_METRICS_BYTES if name == rd.METRICS else rd.MAX_READ_BYTES
        with open(path, "wb") as fh:
            fh.truncate(limit + 1)  # sparse: nothing is written, and gptlab must not read it either
    elif kind == "deep":
        path.write_text('{"status": "completed", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("name, kind, why", [
    (rd.SUMMARY, "/dev/zero", "not a regular file"),
    (rd.SUMMARY, "fifo", "not a regular file"),
    (rd.SUMMARY, "too large", "larger than 64 MiB"),
    (rd.SUMMARY, "deep", "not valid JSON"),
    (rd.CONFIG, "/dev/zero", "not a regular file"),
    (rd.CONFIG, "too large", "larger than 64 MiB"),
    (rd.METRICS, "/dev/zero", "not a regular file"),
    (rd.METRICS, "fifo", "not a regular file"),
    (rd.METRICS, "too large", "larger than 256 MiB"),
])
@pytest.mark.parametrize("command", ["runs", "compare"])
def test_a_hostile_file_of_one_run_is_a_warning_and_a_skip(lab, capsys, name, kind, why, command):
    run = run_of(lab, "b", 1)
    plant(run, name, kind)
    before = hashes(lab.parent.parent)
    start = time.monotonic()
    rc, out, err = run_cli(capsys, command, lab, *(["--json"] if command == "runs" else ["--all"]))
    assert rc == 0, err
    assert time.monotonic() - start < 10
    one_warning(err, "skipping damaged run", str(run), name, why)
    if command == "runs":
        assert listed(out) == {("a", 0), ("a", 1), ("b", 0)}
    else:
        assert "b" in out and "1/1" in out  # b's other seed still makes its row
    assert hashes(lab.parent.parent) == before


@pytest.mark.parametrize("name, kind, why", [
    (rd.SUMMARY, "/dev/zero", "not a regular file"),
    (rd.SUMMARY, "too large", "larger than 64 MiB"),
    (rd.CONFIG, "fifo", "not a regular file"),
    (rd.METRICS, "/dev/zero", "not a regular file"),
])
def test_a_hostile_file_of_the_one_run_shown_is_a_one_line_error(lab, capsys, name, kind, why):
    run = run_of(lab)
    plant(run, name, kind)
    before = hashes(lab.parent.parent)
    one_line_error(*run_cli(capsys, "show", run)[::2], str(run), name, why)
    assert hashes(lab.parent.parent) == before


def test_export_of_a_run_with_a_hostile_config_is_a_one_line_error(lab, capsys):
    run = run_of(lab)
    (run / rd.MODEL).write_bytes(b"\0" * 16)  # export looks for the checkpoint before it reads the config
    plant(run, rd.CONFIG, "/dev/zero")
    out = lab.parent.parent / "hf"
    before = hashes(lab.parent.parent)
    one_line_error(*run_cli(capsys, "export", run, out, "--format", "hf")[::2], str(run), rd.CONFIG,
                   "not a regular file")
    assert hashes(lab.parent.parent) == before and not out.exists()


@pytest.mark.parametrize("content, why", [
    (None, "not a regular file"),  # a link to /dev/zero
    ('{"name": "exp", "compare": ["baseline", "a"]}', "compare as a list"),
    ('{"name": "exp", "variants": "ab"}', "variants as text"),
    ('[1, 2]', "not a JSON object"),
])
def test_a_damaged_experiment_json_is_ignored_with_one_warning(lab, capsys, content, why):
    path = lab / rd.EXPERIMENT
    path.unlink()
    if content is None:
        path.symlink_to("/dev/zero")
    else:
        path.write_text(content)
    before = hashes(lab.parent.parent)
    rc, out, err = run_cli(capsys, "compare", lab)
    assert rc == 0, err
    one_warning(err, "ignoring", str(path), why)
    assert "a" in out and "b" in out
    rc, out, err = run_cli(capsys, "runs", lab, "--json")
    assert rc == 0 and len(listed(out)) == 4
    one_warning(err, str(path))
    assert hashes(lab.parent.parent) == before


def test_metrics_rows_are_bounded_in_number_and_length(lab, capsys, monkeypatch):
    monkeypatch.setattr(rd, "MAX_METRICS_ROWS", 3)
    monkeypatch.setattr(rd, "MAX_METRICS_LINE", 64)
    run = run_of(lab, "b", 1)  # keeps its 4 rows: over the (lowered) row bound
    for other in (run_of(lab, "a", 0), run_of(lab, "a", 1), run_of(lab, "b", 0)):
        (other / rd.METRICS).write_text('{"step": 1}\n')
    rc, out, err = run_cli(capsys, "runs", lab, "--json")
    assert rc == 0 and listed(out) == {("a", 0), ("a", 1), ("b", 0)}
    one_warning(err, str(run), "holds more than 3 rows")
    (run / rd.METRICS).write_text('{"step": 1, "plugin": "' + "x" * 100 + '"}\n')
    rc, out, err = run_cli(capsys, "runs", lab, "--json")
    assert rc == 0
    one_warning(err, str(run), "line 1 is longer than 64 bytes")


# -- YAML aliases are never expanded ---------------------------------------------------------------
BILLION_LAUGHS = "\n".join(
    ['lol0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"lol{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    + ["model: {n_layers: 2}", "data: {}", "train: {}", ""])


@pytest.mark.parametrize("command", ["runs", "compare", "show-experiment"])
def test_a_billion_laughs_config_is_a_warning_and_a_skip_at_once(lab, capsys, command):
    import resource

    run = run_of(lab, "b", 1)
    (run / rd.CONFIG).write_text(BILLION_LAUGHS)
    before = hashes(lab.parent.parent)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    argv = {"runs": ["runs", lab, "--json"], "compare": ["compare", lab], "show-experiment": ["show", lab]}[command]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert time.monotonic() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: well under 200 MiB more
    one_warning(err, "skipping damaged run", str(run), rd.CONFIG, "YAML alias")
    if command == "runs":
        assert listed(out) == {("a", 0), ("a", 1), ("b", 0)}
    assert hashes(lab.parent.parent) == before


def test_a_billion_laughs_config_of_the_one_run_shown_is_a_one_line_error(lab, capsys):
    run = run_of(lab)
    (run / rd.CONFIG).write_text(BILLION_LAUGHS)
    one_line_error(*run_cli(capsys, "show", run)[::2], str(run), rd.CONFIG, "YAML alias")


def test_an_experiment_file_that_expands_beyond_reason_is_not_loaded(lab, capsys):
    """experiment.json names the experiment's YAML (read again to know which runs it defines now):
    aliases are allowed there, a person wrote it, but not a bomb; the recorded definition is used."""
    bomb = lab.parent.parent / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS.replace("model: {n_layers: 2}", "name: exp"))
    meta = json.loads((lab / rd.EXPERIMENT).read_text())
    (lab / rd.EXPERIMENT).write_text(json.dumps({**meta, "source": str(bomb)}))
    start = time.monotonic()
    rc, out, err = run_cli(capsys, "runs", lab, "--json")
    assert (rc, err, len(listed(out))) == (0, "", 4)
    assert time.monotonic() - start < 10


# -- wrong-typed summary and config fields ---------------------------------------------------------
@pytest.mark.parametrize("file, field, value, words", [
    (rd.SUMMARY, "status", ["completed"], ["status a list"]),
    (rd.SUMMARY, "status", "finished", ["status 'finished'"]),
    (rd.SUMMARY, "seed", {"a": 1}, ["seed as a mapping"]),
    (rd.SUMMARY, "seed", 1.5, ["seed as a number"]),
    (rd.SUMMARY, "variant", 7, ["variant as a number"]),
    (rd.SUMMARY, "experiment", ["exp"], ["experiment as a list"]),
    (rd.SUMMARY, "config_hash", 12, ["config_hash as a number"]),
    (rd.SUMMARY, "overrides", "train.steps=5", ["overrides as text"]),
    (rd.CONFIG, "seed", {"a": 1}, ["seed as a mapping"]),
    (rd.CONFIG, "variant", True, ["variant as a boolean"]),
])
@pytest.mark.parametrize("command", ["runs", "compare"])
def test_a_wrong_typed_field_is_a_warning_and_a_skip(lab, capsys, file, field, value, words, command):
    run = run_of(lab, "b", 1)
    data = json.loads((run / file).read_text())  # make_run writes config.yaml as JSON, which is YAML
    (run / file).write_text(json.dumps({**data, field: value}))
    before = hashes(lab.parent.parent)
    rc, out, err = run_cli(capsys, command, lab, *(["--json"] if command == "runs" else []))
    assert rc == 0, err
    one_warning(err, "skipping damaged run", str(run), file, *words)
    if command == "runs":
        assert listed(out) == {("a", 0), ("a", 1), ("b", 0)}
    else:
        assert "1/1" in out
    assert hashes(lab.parent.parent) == before


@pytest.mark.parametrize("command", ["runs", "compare"])
def test_a_number_held_as_text_is_n_a_with_a_warning(lab, capsys, command):
    run = run_of(lab, "b", 1)
    make = json.loads((run / rd.SUMMARY).read_text())
    (run / rd.SUMMARY).write_text(json.dumps({**make, "final_val_loss": "low", "tokens_per_s": [1]}))
    rc, out, err = run_cli(capsys, command, lab, *(["--json"] if command == "runs" else []))
    assert rc == 0, err
    one_warning(err, str(run), "final_val_loss is 'low', not a number", "tokens_per_s is a list", "n/a")
    if command == "runs":
        assert len(listed(out)) == 4  # listed: only the number is unusable


def test_show_run_warns_about_a_number_held_as_text(lab, capsys):
    run = run_of(lab)
    make = json.loads((run / rd.SUMMARY).read_text())
    (run / rd.SUMMARY).write_text(json.dumps({**make, "memory_estimate": "big", "best_val_step": "x"}))
    rc, out, err = run_cli(capsys, "show", run)
    assert rc == 0, err
    one_warning(err, str(run), "memory_estimate is 'big'", "best_val_step is 'x'")


# -- gptlab status: jobs.json of the wrong shape ---------------------------------------------------
def write_jobs(exp: Path, content) -> Path:
    folder = exp / ".submitit"
    folder.mkdir(exist_ok=True)
    path = folder / "jobs.json"
    if content == "/dev/zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content, why", [
    ("/dev/zero", "not a regular file"),
    ("{not json", "not valid JSON"),
    ([1, 2], "not a JSON object"),
    ({"submissions": 5}, "submissions are not a list"),
    ({"submissions": {"a": 1}}, "submissions are not a list"),
    ({"submissions": [5]}, "submission 1 is not a mapping"),
    ({"submissions": [{"launcher": "local", "runs": [1]}]}, "no mapping of runs"),
    ({"submissions": [{"launcher": ["x"], "runs": {}}]}, "launcher other than"),
    ({"submissions": [{"runs": {"a__ha__s9": {"job_id": {"x": 1}}}}]}, "job id"),
    ({"submissions": [{"runs": {"a__ha__s9": 3}}]}, "not a mapping"),
    ({"submissions": [{"runs": {"../../elsewhere": {"job_id": "1"}}}]}, "not a run folder's name"),
    ({"submissions": [{"runs": {"a__ha__s9": {"job_id": "1/../x"}}}]}, "job id"),
    ({"submissions": [{"runs": {"a__ha__s9": {"job_id": "1", "seed": [0]}}}]}, "seed"),
])
@pytest.mark.parametrize("json_out", [False, True])
def test_status_with_a_jobs_json_of_the_wrong_shape_is_one_warning(lab, capsys, content, why, json_out):
    path = write_jobs(lab, content)
    before = hashes(lab.parent.parent)
    rc, out, err = run_cli(capsys, "status", lab, *(["--json"] if json_out else []))
    assert rc == 0, err
    one_warning(err, str(path), why)
    if json_out:
        rows = json.loads(out)
        assert {Path(r["run_dir"]).name for r in rows} == {p.name for p in lab.glob("*__s*")}
    else:
        assert "4 runs" in out
    assert hashes(lab.parent.parent) == before


def test_status_keeps_the_well_formed_submissions(lab, capsys):
    path = write_jobs(lab, {"submissions": [5, {"launcher": "local", "runs": {"c__hc__s0": {
        "job_id": "999999999", "variant": "c", "seed": 0}}}]})
    rc, out, err = run_cli(capsys, "status", lab, "--json")
    assert rc == 0
    one_warning(err, str(path), "submission 1 is not a mapping")
    rows = {Path(r["run_dir"]).name: r for r in json.loads(out)}
    assert rows["c__hc__s0"]["job_id"] == "999999999" and rows["c__hc__s0"]["status"] == "failed"


def test_status_lists_a_damaged_run_as_damaged_with_one_warning(lab, capsys):
    run = run_of(lab, "b", 1)
    plant(run, rd.SUMMARY, "/dev/zero")
    rc, out, err = run_cli(capsys, "status", lab, "--json")
    assert rc == 0, err
    one_warning(err, str(run), "not a regular file")
    rows = {Path(r["run_dir"]).name: r for r in json.loads(out)}
    assert rows[run.name]["status"] == "damaged" and len(rows) == 4


# -- machine-readable output holds only what it claims ---------------------------------------------
def test_status_json_is_json_alone_when_sacct_is_missing(lab, tmp_path):
    """submitit logs "Bypassing sacct error" to stdout (and stderr) when sacct cannot run: a
    separate process, so submitit's logging is configured as a user's shell would have it."""
    pytest.importorskip("submitit")
    write_jobs(lab, {"submissions": [{"launcher": "slurm", "runs": {
        "c__hc__s0": {"job_id": "4242_0", "variant": "c", "seed": 0}}}]})
    empty = tmp_path / "no-slurm"
    empty.mkdir()
    proc = run_subprocess("status", lab, "--json", cwd=tmp_path, timeout=60,
                          env={"PATH": str(empty), "SUBMITIT_LOG_LEVEL": None})
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["run_dir"]).name: r for r in json.loads(proc.stdout)}  # stdout is JSON and nothing else
    assert rows["c__hc__s0"]["status"] == "queued" and rows["c__hc__s0"]["job_state"] == "UNKNOWN"
    one_warning(proc.stderr, "Slurm could not be asked", "sacct")


@pytest.mark.parametrize("argv", [["runs", "--json"], ["compare", "--format", "json"], ["compare", "--format", "csv"]])
def test_machine_readable_output_holds_no_warning(lab, capsys, argv):
    plant(run_of(lab, "b", 1), rd.SUMMARY, "/dev/zero")
    rc, out, err = run_cli(capsys, argv[0], lab, *argv[1:])
    assert rc == 0, err
    assert "warning" not in out and "skipping damaged run" in err
    if argv[-1] == "csv":
        import csv
        import io

        assert list(csv.DictReader(io.StringIO(out)))
    else:
        json.loads(out)
