"""Nothing a user types or a disk holds crashes gptlab, corrupts a result or writes outside the results.

Every case calls ``gptlab.cli.main`` in-process (the code path of the command) against a tiny
experiment and checks the one-line error and exit status 2, or that a damaged file is never
trusted. The fault-injection test stops the runner at each of its writes, as a kill would, in a
first run and under --force, and checks what is on disk and what a rerun makes of it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import gptlab.files as files
import gptlab.rundir as rd

from helpers import run_cli, run_subprocess, wait_for, write_lab

TINY = {
    "name": "tiny",
    "model": {"preset": "nano", "n_layers": 1, "context_length": 32},
    "train": {"steps": 4, "batch_size": 2, "eval_every": 2, "log_every": 2, "eval_batches": 1,
              "checkpoint_every": 2, "checkpoint": True},
    "variants": {"a": {}},
    "seeds": [0],
}


@pytest.fixture
def lab(workdir):
    write_lab(workdir, TINY, "tiny.yaml")
    return workdir


def one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("gptlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def trained(lab: Path, capsys) -> Path:
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu")
    assert rc == 0, err
    (run,) = (lab / "results" / "tiny").glob("a__*__s0")
    return run


# -- user mistakes: one line, exit 2, nothing written ---------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("seeds={a: 1}", ["does not fit"]),
    ("seeds=3", ["'seeds' must be a non-empty list"]),
    ("seeds=[100000000000000000000000]", ["2**63-1"]),
    ("seeds=[-1]", ["'seeds'"]),
    ("train.min_lr=-1.0", ["train.min_lr"]),
    ("train.grad_clip=-1.0", ["train.grad_clip"]),
    ("train.weight_decay=-1.0", ["train.weight_decay"]),
    ("train.lr=.nan", ["train.lr", "nan"]),
    ("train.beta1=2.0", ["train.beta1", "[0, 1)"]),
    ("train.checkpoint_every=-5", ["train.checkpoint_every"]),
    ("model.activation={name: swiglu, hidden_dim: 0}", ["swiglu", "hidden_dim", ">= 1"]),
    ("model.activation={name: swiglu, hidden_dim: 96.0}", ["hidden_dim", "integer"]),
    ("model.position={name: rope, base: 0}", ["rope", "base", "> 0"]),
    ("model.norm={name: layernorm, eps: -1e-5}", ["layernorm", "eps"]),
    ("model.norm={name: layernorm, eps: x}", ["layernorm", "eps", "'x'"]),
    ("model.attention={name: sdpa, n_kv_heads: 0}", ["n_kv_heads"]),
])
def test_bad_values_are_one_line_and_touch_nothing(lab, capsys, override, words):
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", override, "--device", "cpu")
    one_line_error(rc, err, *words)
    assert not (lab / "results").exists()


def test_an_empty_variants_mapping_is_refused(lab, capsys):
    (lab / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "variants": {}}))
    one_line_error(*run_cli(capsys, "run", "tiny.yaml", "--device", "cpu")[::2], "'variants'")


@pytest.mark.parametrize("name", [".hidden", "a/b", "-dash", "tab\there"])
def test_variant_names_that_could_not_work_everywhere_are_refused(lab, capsys, name):
    (lab / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "variants": {name: {}}}))
    one_line_error(*run_cli(capsys, "run", "tiny.yaml", "--device", "cpu")[::2], "variant name")


def test_markup_in_a_variant_name_is_shown_literally(lab, capsys):
    name = "[bold]b[red]x"  # markup to rich (a "[/bold]" name is refused: it holds a slash)
    (lab / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "variants": {
        name: {}, "act[gelu]": {"model": {"activation": "gelu_tanh"}}}}))
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu", "--dry-run")
    assert rc == 0 and name in out and "act[gelu]" in out
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "compare", "results/tiny", "--format", "csv")
    assert rc == 0 and name in out and "act[gelu]" in out


def test_read_only_experiment_and_cache_folders(lab, capsys, monkeypatch):
    """A folder that refuses writes (read-only; simulated, since root ignores permission bits)."""
    import tempfile

    trained(lab, capsys)
    real = tempfile.mkdtemp
    for folder in (lab / "results" / "tiny", lab / "results" / ".cache" / "tokens"):
        before = snapshot(lab / "results")

        def refusing(*args, dir=None, _folder=folder, **kwargs):
            if Path(dir).resolve() == _folder.resolve():
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", refusing)
        rc, out, err = run_cli(capsys, "run", "tiny.yaml", "train.steps=2", "--device", "cpu")
        monkeypatch.setattr(tempfile, "mkdtemp", real)
        one_line_error(rc, err, str(folder), "Permission denied")
        assert snapshot(lab / "results") == before


def test_unwritable_results_dir(lab, capsys):
    one_line_error(*run_cli(capsys, "run", "tiny.yaml", "--results-dir", "/proc/forbidden", "--device", "cpu")[::2],
                   "/proc/forbidden", "cannot be created")


# -- damaged files are never trusted -------------------------------------------------------------
def test_a_damaged_token_cache_is_rebuilt(lab, capsys):
    run = trained(lab, capsys)
    reference = json.loads((run / "summary.json").read_text())["final_val_loss"]
    cache = lab / "results" / ".cache" / "tokens"
    (meta,) = cache.glob("*.json")
    (blob,) = cache.glob("*.bin")
    good = blob.read_bytes()
    def without_checksum():  # a cache an earlier gptlab wrote
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "sha256"}))

    for damage, why in ((lambda: blob.write_bytes(good[: len(good) // 2]), "do not match"),  # half the corpus
                        (lambda: blob.write_bytes(b""), "do not match"),
                        (lambda: blob.write_bytes(good[:-1]), "do not match"),  # odd length
                        (lambda: meta.write_text(meta.read_text()[:40]), "unreadable"),  # truncated JSON
                        (without_checksum, "earlier gptlab")):
        damage()
        rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu", "--force")
        assert rc == 0, err
        assert "token cache" in err and "cannot be trusted" in err and why in err and "rebuilding" in err
        assert blob.read_bytes() == good
        assert json.loads((run / "summary.json").read_text())["final_val_loss"] == reference


def test_compare_and_show_skip_damaged_runs_with_one_line(lab, capsys):
    run = trained(lab, capsys)
    exp = run.parent
    bad = {"config-list": ("config.yaml", "- 1\n- 2\n"), "summary-list": ("summary.json", "[1, 2]"),
           "utf8": ("metrics.jsonl", b'{"step": 1, "train_loss": 2.0}\n\xff\xfe\n{"step": 2}\n'),
           "strings": ("metrics.jsonl", '{"step": 1, "train_loss": "high"}\n{"step": 2}\n')}
    for name, (file, content) in bad.items():
        other = exp / f"{name}__h{len(name)}__s0"
        other.mkdir()
        (other / "summary.json").write_text(json.dumps({"status": "completed", "variant": name}))
        (other / "config.yaml").write_text("model: {}\n")
        (other / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    (exp / "stranger").mkdir()  # a folder another tool wrote
    (exp / "stranger" / "config.yaml").write_text("just: [a, list]\nmodel: 3\n")
    rc, out, err = run_cli(capsys, "compare", str(exp), "--all")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "skipping damaged run" in line]
    assert len(warnings) == 5 and "Traceback" not in err
    assert "a " in out and "config-list" not in out
    rc, out, err = run_cli(capsys, "show", str(exp))
    assert rc == 0 and "Traceback" not in err
    one_line_error(*run_cli(capsys, "show", str(exp / "strings__h7__s0"))[::2], "strings__h7__s0", "metrics.jsonl")


def test_a_metric_held_as_text_is_n_a_not_an_unknown_metric(lab, capsys):
    run = trained(lab, capsys)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "final_val_loss": "low"}))
    rc, out, err = run_cli(capsys, "compare", str(run.parent), "--format", "json")
    assert rc == 0, err
    (row,) = json.loads(out)
    assert row["val_loss_mean"] is None and row["n"] == 0 and row["n_total"] == 1  # n/a, and counted as not usable


def test_results_are_read_as_plain_data(lab, capsys, monkeypatch):
    run = trained(lab, capsys)
    monkeypatch.setenv("GPTLAB_TEST_SECRET", "hunter2")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["attention"] = "${oc.env:GPTLAB_TEST_SECRET}"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rc, out, err = run_cli(capsys, "compare", str(run.parent), "--format", "md")
    assert rc == 0 and "hunter2" not in out + err
    rc, out, err = run_cli(capsys, "show", str(run))
    assert rc == 0 and "hunter2" not in out + err
    assert "attention=${oc.env:GPTLAB_TEST_SECRET}" in out  # shown as the text it is


def test_generate_names_the_file_it_cannot_read(lab, capsys):
    run = trained(lab, capsys)
    (run / "tokenizer.json").write_text("{garbage")
    one_line_error(*run_cli(capsys, "generate", str(run), "--prompt", "x")[::2], "tokenizer.json")
    (run / "tokenizer.json").write_text(json.dumps({"state": {}, "vocab_size": 256}))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("n_layers: 1", "n_layers: one"))
    one_line_error(*run_cli(capsys, "generate", str(run), "--prompt", "x")[::2], "config.yaml", "n_layers")


# -- links gptlab did not make -------------------------------------------------------------------
def test_planted_links_are_refused_and_never_written_through(lab, capsys, tmp_path_factory):
    run = trained(lab, capsys)
    outside = tmp_path_factory.mktemp("outside")
    victim = outside / "victim.txt"
    victim.write_text("precious")
    for planted in (run / ".lock", run / "metrics.jsonl", run / ".config.yaml.tmp"):
        saved = planted.read_bytes() if planted.exists() and not planted.is_symlink() else None
        planted.unlink(missing_ok=True)
        planted.symlink_to(victim)
        rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu", "--force")
        assert victim.read_text() == "precious", planted.name
        if planted.name == ".config.yaml.tmp":  # a stale temporary: removed, not followed
            assert rc == 0 and not planted.is_symlink(), err
        else:
            one_line_error(rc, err, planted.name, "symbolic link")
        planted.unlink(missing_ok=True)
        if saved is not None:
            planted.write_bytes(saved)
    # a run folder that is a link to somewhere else is not written into
    elsewhere = outside / "run"
    elsewhere.mkdir()
    moved = run.rename(run.with_name(run.name + ".moved"))
    run.symlink_to(elsewhere, target_is_directory=True)
    rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu", "--force")
    one_line_error(rc, err, run.name, "symbolic link")
    assert list(elsewhere.iterdir()) == [] and moved.exists()


# -- signals and kills ---------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` catches it."""


@pytest.mark.parametrize("mode", ["first run", "--force"])
def test_a_kill_at_any_write_never_leaves_a_run_that_looks_finished(lab, capsys, monkeypatch, mode):
    reference = [r for r in map(json.loads, (trained(lab, capsys) / "metrics.jsonl").read_text().splitlines())]
    real = rd.write_text_atomic
    point = 0
    while True:
        point += 1
        root = lab / f"k{point}"
        if mode == "first run":
            root.mkdir()
        else:
            import shutil

            shutil.copytree(lab / "results", root)
        calls = [0]

        def dying(path, text, _at=point):
            calls[0] += 1
            if calls[0] == _at:
                raise Killed
            return real(path, text)

        monkeypatch.setattr(rd, "write_text_atomic", dying)  # rundir re-exports the writer of gptlab.files:
        monkeypatch.setattr(files, "write_text_atomic", dying)  # writes reach it by either name
        argv = ["run", "tiny.yaml", "--device", "cpu", "--results-dir", root] + (["--force"] if mode == "--force" else [])
        try:
            run_cli(capsys, *argv)
            killed = False
        except Killed:
            killed = True
        monkeypatch.setattr(rd, "write_text_atomic", real)
        monkeypatch.setattr(files, "write_text_atomic", real)
        capsys.readouterr()
        for run in (root / "tiny").glob("a__*"):
            summary = rd.read_summary(run) or {}
            if rd.run_status(run, summary) == rd.COMPLETED:  # then everything of it is there
                rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                assert rows and rows[-1]["step"] == 4 and (run / "model.safetensors").is_file(), point
        rc, out, err = run_cli(capsys, "run", "tiny.yaml", "--device", "cpu", "--results-dir", root)
        assert rc == 0, (point, err)
        (run,) = (root / "tiny").glob("a__*__s0")
        assert rd.read_summary(run)["status"] == rd.COMPLETED
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["train_loss"]) for r in rows] == [(r["step"], r["train_loss"]) for r in reference]
        assert not [p for p in run.glob(".*.tmp*")], point  # stale temporaries were cleaned
        if not killed:
            break
    assert point > 5  # every write of a run was a kill point once


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line_and_130(lab, sig):
    """Before training starts (torch still loading, seen in the process's memory maps): no traceback,
    the documented status."""
    import signal

    proc = run_subprocess("run", "tiny.yaml", "--device", "cpu", cwd=lab, wait=False)
    maps = Path(f"/proc/{proc.pid}/maps")
    wait_for(lambda: "libtorch" in maps.read_text(), timeout=60, what="torch loading", proc=proc,
             interval=0.01)  # inside gptlab, loading torch
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "gptlab: interrupted" in err
