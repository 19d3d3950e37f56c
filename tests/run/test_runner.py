"""The experiment runner end to end: results layout, skip-on-rerun, divergence, failures, Ctrl-C,
determinism, lifecycle hooks and a run another process holds.

Every training run here is tiny (preset nano: 2 layers x 64 wide, context 64; <= 20 steps of
batch 4), so the whole file stays well under a minute on a shared 2-core CPU. The main
end-to-end path (first run, rerun) and Ctrl-C go through a real ``python -m gptlab.cli``
subprocess; the other behaviours call ``gptlab.cli.main(argv)`` in-process (the same code path,
minus ~3 s of interpreter and torch start-up per call on this machine).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import gptlab
from gptlab.run.experiment import config_hash

from helpers import HOLD_PLUGIN, held, hold, release, run_subprocess, snapshot, write_lab

TRAIN = dict(steps=10, batch_size=4, eval_every=10, eval_batches=1, log_every=5)
BASE = {
    "name": "tiny",
    "model": {"preset": "nano"},
    "data": {"dataset": "python_docs", "tokenizer": "bytes"},
    "train": dict(TRAIN),
    "variants": {"a": {}, "b": {"model": {"norm": "rmsnorm"}}},
    "seeds": [0, 1],
}


# -- helpers ---------------------------------------------------------------------------------
def run_dirs(exp_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(exp_dir.iterdir()) if p.is_dir()}


def by_variant_seed(exp_dir: Path) -> dict[tuple[str, int], Path]:
    out = {}
    for name, path in run_dirs(exp_dir).items():
        variant, _hash, seed = name.split("__")
        key = (variant, int(seed[1:]))
        assert key not in out, f"two directories for {key}: {out[key].name} and {name}"
        out[key] = path
    return out


def metrics(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in metrics(run_dir)]


# -- 1. end to end through a real subprocess ------------------------------------------------
@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The tiny experiment (2 variants x 2 seeds) run once through ``python -m gptlab.cli run``."""
    root = tmp_path_factory.mktemp("e2e")
    exp = write_lab(root, BASE, "tiny.yaml")
    proc = run_subprocess("run", exp, "--results-dir", root / "results", "--device", "cpu", cwd=root,
                          module="gptlab.cli", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return root, exp, proc


@pytest.fixture
def copied(first_run, tmp_path):
    """A private copy (mtimes preserved) of the first run's results and YAML."""
    root, exp, _ = first_run
    shutil.copytree(root / "results", tmp_path / "results")
    shutil.copy2(exp, tmp_path / "tiny.yaml")
    return tmp_path


def test_first_run_writes_the_documented_files(first_run):
    root, _, proc = first_run
    exp_dir = root / "results" / "tiny"
    assert "Traceback" not in proc.stdout + proc.stderr

    experiment = json.loads((exp_dir / "experiment.json").read_text())
    assert experiment["name"] == "tiny"
    assert experiment["variants"] == ["a", "b"]
    assert experiment["base"]["model"]["emb_dim"] == 64 and experiment["base"]["train"]["steps"] == 10

    runs = by_variant_seed(exp_dir)
    assert sorted(runs) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    hash_a, hash_b = runs["a", 0].name.split("__")[1], runs["b", 0].name.split("__")[1]
    assert hash_a != hash_b
    assert runs["a", 1].name.split("__")[1] == hash_a  # the seed is not part of the config hash

    import gptlab.builtin_plugins as bp
    import torch
    from gptlab.plugin.manager import PluginSystem

    builtins = PluginSystem()
    builtins.load_builtins()
    builtin_dir = Path(bp.__file__).parent
    expected_params = {"a": gptlab.GPTModel(gptlab.PRESETS["nano"], plugins=builtins).num_parameters(),
                       "b": gptlab.GPTModel({**gptlab.PRESETS["nano"], "norm": "rmsnorm"},
                                            plugins=builtins).num_parameters()}

    for (variant, seed), run_dir in runs.items():
        # config.yaml: the fully resolved config plus variant, seed and the hash that names the dir
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        assert cfg["variant"] == variant and cfg["seed"] == seed and cfg["experiment"] == "tiny"
        resolved = {k: cfg[k] for k in ("model", "data", "train")}
        assert cfg["config_hash"] == config_hash(resolved) == run_dir.name.split("__")[1]
        assert resolved["model"]["emb_dim"] == 64 and resolved["model"]["n_layers"] == 2
        assert resolved["model"]["context_length"] == 64 and resolved["model"]["n_heads"] == 4
        assert resolved["model"]["norm"] == ("rmsnorm" if variant == "b" else "layernorm")
        assert resolved["train"]["steps"] == 10 and resolved["train"]["batch_size"] == 4
        assert resolved["data"] == {"dataset": "python_docs", "tokenizer": "bytes", "val_fraction": 0.1, "workers": None,
                                    "shard_tokens": 100_000_000}

        # metrics.jsonl: one row per log step; val_loss only at eval steps (here: the last one)
        rows = metrics(run_dir)
        assert [r["step"] for r in rows] == [5, 10]
        for r in rows:
            assert r["tokens"] == r["step"] * 4 * 64
            assert math.isfinite(r["train_loss"]) and 0 < r["train_loss"] < 10
            assert r["lr"] > 0
            assert r["tokens_per_s"] > 0
        assert "val_loss" not in rows[0]
        assert math.isfinite(rows[1]["val_loss"])

        # summary.json
        s = summary(run_dir)
        assert s["status"] == "completed"
        assert s["variant"] == variant and s["seed"] == seed and s["config_hash"] == cfg["config_hash"]
        assert s["final_val_loss"] == rows[-1]["val_loss"]
        assert s["best_val_loss"] == min(r["val_loss"] for r in rows if r.get("val_loss") is not None)
        assert s["final_train_loss"] == rows[-1]["train_loss"]
        assert s["tokens_per_s"] > 0 and s["wall_time_s"] > 0
        assert s["parameters"] == expected_params[variant]
        assert s["versions"]["gptlab"] == gptlab.__version__
        assert s["versions"]["torch"] == torch.__version__
        assert s["versions"]["python"].count(".") == 2
        assert "cpu" in s["device"].lower()
        assert not (run_dir / "error.txt").exists()
        # every plugin that built the run, with the sha256 of its file
        plugins = s["plugins"]
        for name in ("attention_sdpa", "position_learned", "norm_layernorm", "norm_rmsnorm", "placement_pre",
                     "activation_mlp", "dataset_python_docs", "tokenizer_bytes"):
            assert name in plugins, f"{name} missing from summary plugins: {sorted(plugins)}"
            digest = hashlib.sha256((builtin_dir / f"{name}.py").read_bytes()).hexdigest()
            recorded = plugins[name].split("sha256:")[-1]
            assert len(recorded) >= 12 and digest.startswith(recorded), (name, plugins[name])


def test_rerun_trains_nothing_and_keeps_every_file(copied):
    exp_dir = copied / "results" / "tiny"
    before = {name: snapshot(d) for name, d in run_dirs(exp_dir).items()}
    proc = run_subprocess("run", copied / "tiny.yaml", "--results-dir", copied / "results", "--device", "cpu",
                          cwd=copied, module="gptlab.cli", timeout=120)
    assert proc.returncode == 0, proc.stderr
    after = {name: snapshot(d) for name, d in run_dirs(exp_dir).items()}
    assert after == before  # same directories, byte-identical files, unchanged mtimes
    assert "(4 finished runs kept)" in proc.stderr.splitlines()[0], proc.stderr  # the experiment line says so


def test_adding_a_variant_runs_only_the_new_one(copied, cli):
    exp_dir = copied / "results" / "tiny"
    before = {name: snapshot(d) for name, d in run_dirs(exp_dir).items()}
    doc = json.loads(json.dumps(BASE))
    doc["variants"]["c"] = {"model": {"activation": "relu"}}
    write_lab(copied, doc, "tiny.yaml")
    rc, out, err = cli("run", copied / "tiny.yaml", "--results-dir", copied / "results", "--device", "cpu")
    assert rc == 0, err
    runs = by_variant_seed(exp_dir)
    assert sorted(runs) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    for name, files in before.items():
        assert snapshot(exp_dir / name) == files, f"{name} was touched"
    for seed in (0, 1):
        assert summary(runs["c", seed])["status"] == "completed"
        assert OmegaConf.load(runs["c", seed] / "config.yaml").model.activation == "relu"
    assert json.loads((exp_dir / "experiment.json").read_text())["variants"] == ["a", "b", "c"]


def test_force_reruns_everything_in_the_same_directories(copied, cli):
    exp_dir = copied / "results" / "tiny"
    before = {name: summary(d) for name, d in run_dirs(exp_dir).items()}
    mtimes = {name: (d / "summary.json").stat().st_mtime_ns for name, d in run_dirs(exp_dir).items()}
    rc, out, err = cli("run", copied / "tiny.yaml", "--force", "--results-dir", copied / "results",
                          "--device", "cpu")
    assert rc == 0, err
    assert "kept" not in out.lower()
    dirs = run_dirs(exp_dir)
    assert sorted(dirs) == sorted(before)  # retrained in place: no duplicates, nothing lost
    for name, d in dirs.items():
        s = summary(d)
        assert s["status"] == "completed"
        assert (d / "summary.json").stat().st_mtime_ns != mtimes[name]
        assert s["wall_time_s"] != before[name]["wall_time_s"]
        assert [r["step"] for r in metrics(d)] == [5, 10]  # the metrics log was restarted, not appended
        # deterministic on CPU: retraining gives the same losses
        assert s["final_val_loss"] == before[name]["final_val_loss"]


def test_dry_run_lists_runs_and_trains_nothing(first_run, copied, cli, tmp_path):
    root, exp, _ = first_run
    hashes = {d.name.split("__")[1] for d in run_dirs(root / "results" / "tiny").values()}
    fresh = tmp_path / "fresh"
    rc, out, err = cli("run", exp, "--dry-run", "--results-dir", fresh, "--device", "cpu")
    assert rc == 0, err
    for h in hashes:
        assert h in out  # every run is listed with its config hash
    assert "norm=rmsnorm" in out  # and what its variant changes
    assert not (fresh / "tiny").exists()
    assert not fresh.exists()  # not even the results folder

    # on existing results: finished runs are listed as skipped, new hashes as to run; nothing is written
    before = snapshot(copied / "results")
    rc, out, err = cli("run", copied / "tiny.yaml", "--dry-run", "--results-dir", copied / "results",
                          "--device", "cpu")
    assert rc == 0, err
    assert out.count("skip") == 4 and all(h in out for h in hashes)
    rc, out, err = cli("run", copied / "tiny.yaml", "train.steps=6", "--dry-run",
                          "--results-dir", copied / "results", "--device", "cpu")
    assert rc == 0, err
    assert "skip" not in out and not any(h in out for h in hashes)  # the override changes every hash
    assert snapshot(copied / "results") == before


def test_overrides_apply_to_every_run_and_change_the_hash(copied, cli):
    exp_dir = copied / "results" / "tiny"
    before = {name: snapshot(d) for name, d in run_dirs(exp_dir).items()}
    rc, out, err = cli("run", copied / "tiny.yaml", "train.steps=6", "--results-dir", copied / "results",
                          "--device", "cpu")
    assert rc == 0, err
    dirs = run_dirs(exp_dir)
    new = {name: d for name, d in dirs.items() if name not in before}
    assert len(new) == 4  # every variant x seed ran again under a new hash
    old_hashes = {name.split("__")[1] for name in before}
    for name, d in new.items():
        assert name.split("__")[1] not in old_hashes
        cfg = OmegaConf.load(d / "config.yaml")
        assert cfg.train.steps == 6
        assert metrics(d)[-1]["step"] == 6
        assert summary(d)["status"] == "completed"
    assert sorted(n.split("__")[0] for n in new) == ["a", "a", "b", "b"]
    for name, files in before.items():
        assert snapshot(exp_dir / name) == files


def test_a_smoke_run_stays_out_of_the_experiments_table(copied, cli):
    exp_dir = copied / "results" / "tiny"
    rc, out, err = cli("run", copied / "tiny.yaml", "train.steps=4", "--results-dir", copied / "results",
                          "--device", "cpu")
    assert rc == 0, err
    meta = json.loads((exp_dir / "experiment.json").read_text())
    assert meta["base"]["train"]["steps"] == TRAIN["steps"]  # the file's definition, not the override's
    assert sorted(meta["defined"].values()) == ["a", "b"] and meta["source"] == str((copied / "tiny.yaml").resolve())
    smoke = [d for d in run_dirs(exp_dir).values() if summary(d)["overrides"] == ["train.steps=4"]]
    assert len(smoke) == 4 and all(summary(d)["config_hash"] not in meta["defined"] for d in smoke)

    rc, out, err = cli("compare", exp_dir, "--format", "csv")
    rows = [line.split(",") for line in out.strip().splitlines()]
    assert rc == 0 and [r[0] for r in rows[1:]] == ["a", "b"]  # the smoke runs are neither rows nor baseline
    assert "4 run(s) not shown" in err
    rc, out, err = cli("compare", exp_dir, "--format", "json", "--all")
    table = json.loads(out)
    assert [r["n"] for r in table] == [2, 2, 2, 2] and sum(r["overrides"] == "train.steps=4" for r in table) == 2
    assert [r["baseline"] for r in table] == [True, False, False, False] and table[0]["defined"]

    # the file changes: every run is now of an earlier version; rather than an empty table, all of them
    # are shown, each row marked with how its runs were made
    doc = yaml.safe_load((copied / "tiny.yaml").read_text())
    doc["train"]["lr"] = 0.002
    write_lab(copied, doc, "tiny.yaml")
    rc, out, err = cli("compare", exp_dir, "--format", "json")
    table = json.loads(out)
    assert rc == 0 and [r["n"] for r in table] == [2, 2, 2, 2] and not any(r["defined"] for r in table)
    rc, out, err = cli("compare", exp_dir)
    assert rc == 0 and "made with" in out and "earlier version of the file" in out


def test_compact_component_override_from_the_readme(cli, tmp_path):
    """README: ``model.position={name:rope,base:500}`` is a valid override."""
    exp = write_lab(tmp_path, BASE, "tiny.yaml")
    rc, out, err = cli("run", exp, "model.position={name:rope,base:500}", "--dry-run",
                          "--results-dir", tmp_path / "results", "--device", "cpu")
    assert rc == 0, err
    assert "rope" in out


def test_experiment_without_variants_is_one_base_variant(cli, tmp_path):
    doc = {k: v for k, v in BASE.items() if k != "variants"}
    exp = write_lab(tmp_path, doc, "tiny.yaml")
    rc, out, err = cli("run", exp, "--dry-run", "--results-dir", tmp_path / "results", "--device", "cpu")
    assert rc == 0, err
    assert "base" in out


# -- CLI surface ------------------------------------------------------------------------------
def test_run_help_documents_the_experiment_format(cli):
    rc, out, err = cli("run", "--help")
    assert rc == 0, err
    for word in ("variants", "grid", "seeds", "--results-dir", "--force", "--dry-run", "key=value"):
        assert word in out, word


def test_plugins_json_lists_builtins_with_hashes(cli):
    rc, out, err = cli("plugins", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    import gptlab.builtin_plugins as bp

    for name in ("attention_sdpa", "attention_vanilla", "position_rope", "tokenizer_bytes", "dataset_text"):
        row = by_name[name]
        assert row["source"] == "builtin"
        digest = hashlib.sha256((Path(bp.__file__).parent / f"{name}.py").read_bytes()).hexdigest()
        assert row["version"].startswith("sha256:") and digest.startswith(row["version"][len("sha256:"):])
        assert Path(row["location"]).name == f"{name}.py"
    assert "attention:sdpa" in by_name["attention_sdpa"]["components"]
    assert len(rows) == len(by_name)  # the checkout's ./plugins is the built-ins folder: loaded once


def test_components_json_lists_attentions_with_docs(cli):
    rc, out, err = cli("components", "attention", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    names = {r["name"]: r for r in rows}
    assert {"sdpa", "vanilla"} <= set(names)
    assert {r["kind"] for r in rows} == {"attention"}
    for r in rows:
        assert r["doc"] and "\n" not in r["doc"]
        assert r["plugin"]
    assert names["sdpa"]["plugin"] == "attention_sdpa"


# -- 2. divergence ----------------------------------------------------------------------------
def test_divergence_is_a_result_and_the_sweep_goes_on(cli, tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["name"] = "div"
    doc["seeds"] = [0]
    doc["variants"] = {"absurd_lr": {"train": {"lr": 1.0e6, "grad_clip": None}}, "ok": {}}
    exp = write_lab(tmp_path, doc, "div.yaml")
    results = tmp_path / "results"
    rc, out, err = cli("run", exp, "--results-dir", results, "--device", "cpu")
    assert rc == 0, err  # diverged is a result, not a failure
    runs = by_variant_seed(results / "div")
    s = summary(runs["absurd_lr", 0])
    assert s["status"] == "diverged"
    assert s["diverged_step"] == TRAIN["log_every"] == 5  # lr 1e6 breaks the first steps; seen at the first log step
    assert s["error"] == "loss became nan at step 5"
    assert all(r["step"] < s["diverged_step"] for r in metrics(runs["absurd_lr", 0]))
    assert summary(runs["ok", 0])["status"] == "completed"

    before = {name: snapshot(d) for name, d in run_dirs(results / "div").items()}
    rc, out, err = cli("run", exp, "--results-dir", results, "--device", "cpu")
    assert rc == 0, err
    assert {name: snapshot(d) for name, d in run_dirs(results / "div").items()} == before


# -- 3. a plugin that fails mid-run -----------------------------------------------------------
FLAKY_ATTENTION = '''
    """Attention 'flaky': SDPA that raises on its 5th forward call."""
    import torch.nn.functional as F

    import gptlab
    from gptlab.plugin.layers import CausalSelfAttention

    CALLS = [0]


    class FlakyAttention(CausalSelfAttention):
        """Causal SDPA attention that raises RuntimeError on the 5th forward call."""

        def attend(self, q, k, v, ctx):
            CALLS[0] += 1
            if CALLS[0] == 5:
                raise RuntimeError("flaky attention gave up on call 5")
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "flaky", FlakyAttention)
'''


def test_failing_plugin_is_recorded_and_only_it_is_redone(cli, tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc.update(name="flaky", plugins=["flaky.py"], seeds=[0])
    doc["variants"] = {"before": {}, "broken": {"model": {"attention": "flaky"}}, "after": {"model": {"norm": "rmsnorm"}}}
    exp = write_lab(tmp_path, doc, "flaky.yaml", plugins={"flaky.py": FLAKY_ATTENTION})
    results = tmp_path / "results"
    rc, out, err = cli("run", exp, "--results-dir", results, "--device", "cpu")
    assert rc == 1  # something failed
    assert "Traceback" not in out + err
    runs = by_variant_seed(results / "flaky")
    broken = runs["broken", 0]
    s = summary(broken)
    assert s["status"] == "failed"
    assert "RuntimeError" in s["error"] and "call 5" in s["error"]
    trace = (broken / "error.txt").read_text()
    assert "Traceback" in trace and "flaky attention gave up on call 5" in trace and "flaky.py" in trace
    for name in ("before", "after"):
        assert summary(runs[name, 0])["status"] == "completed"
        assert not (runs[name, 0] / "error.txt").exists()

    kept = {name: snapshot(runs[name, 0]) for name in ("before", "after")}
    broken_mtime = (broken / "summary.json").stat().st_mtime_ns
    rc, out, err = cli("run", exp, "--results-dir", results, "--device", "cpu")
    assert rc == 1  # redone, and (a fresh process of the plugin) failed again
    runs_after = by_variant_seed(results / "flaky")
    assert sorted(runs_after) == sorted(runs)
    for name in ("before", "after"):
        assert snapshot(runs_after[name, 0]) == kept[name]
    assert (broken / "summary.json").stat().st_mtime_ns != broken_mtime
    assert summary(broken)["status"] == "failed"
    assert "Traceback" in (broken / "error.txt").read_text()


# -- 4. Ctrl-C, then rerun --------------------------------------------------------------------
def test_ctrl_c_marks_the_run_interrupted_and_a_rerun_resumes(tmp_path, cli):
    doc = json.loads(json.dumps(BASE))
    doc.update(name="ctrlc", plugins=["hold.py"], seeds=[0])
    doc["train"]["steps"] = 20
    doc["variants"] = {"quick": {}, "slow": {"model": {"activation": "relu"}}}
    exp = write_lab(tmp_path, doc, "ctrlc.yaml", plugins={"hold.py": HOLD_PLUGIN})
    results = tmp_path / "results"
    exp_dir = results / "ctrlc"
    hold(tmp_path, 5, "slow")  # the slow run waits inside its first log step: it is mid-training
    proc = run_subprocess("run", exp, "--results-dir", results, "--device", "cpu", cwd=tmp_path,
                          module="gptlab.cli", wait=False)
    try:
        held(tmp_path, proc, timeout=60)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    release(tmp_path)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    runs = by_variant_seed(exp_dir)
    assert sorted(runs) == [("quick", 0), ("slow", 0)]
    assert summary(runs["quick", 0])["status"] == "completed"
    s = summary(runs["slow", 0])
    assert s["status"] == "interrupted"
    assert s.get("step", 0) < 20

    quick = snapshot(runs["quick", 0])
    rc, out, err = cli("run", exp, "--results-dir", results, "--device", "cpu")  # released: nothing holds
    assert rc == 0, err
    runs_after = by_variant_seed(exp_dir)  # exactly one directory per (variant, seed)
    assert runs_after == runs
    assert snapshot(runs["quick", 0]) == quick
    s = summary(runs["slow", 0])
    assert s["status"] == "completed"
    assert [r["step"] for r in metrics(runs["slow", 0])] == [5, 10, 15, 20]  # restarted, not appended
    assert not list(exp_dir.rglob(".*.tmp*"))  # no half-written summaries left behind


# -- 5. determinism ---------------------------------------------------------------------------
def test_same_seed_same_curve_other_seed_other_curve(cli, tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc.update(name="det", variants={"a": {}})
    doc["train"]["eval_every"] = 5
    exp = write_lab(tmp_path, doc, "det.yaml")
    curves = []
    for results in ("r1", "r2"):
        rc, out, err = cli("run", exp, "--results-dir", tmp_path / results, "--device", "cpu")
        assert rc == 0, err
        curves.append({key: curve(d) for key, d in by_variant_seed(tmp_path / results / "det").items()})
    first, second = curves
    assert first[("a", 0)] == second[("a", 0)]
    assert first[("a", 1)] == second[("a", 1)]
    assert all(v is not None for _, _, v in first[("a", 0)])  # val_loss at both eval steps
    assert first[("a", 0)] != first[("a", 1)]
    assert [t for _, t, _ in first[("a", 0)]] != [t for _, t, _ in first[("a", 1)]]


# -- 6. lifecycle hooks -----------------------------------------------------------------------
SINK = '''
    """A metrics sink: every lifecycle hook appends a JSON line to <run dir>/sink.jsonl."""
    import json

    import gptlab


    def _write(run, record):
        with open(run.dir / "sink.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\\n")


    @gptlab.hookimpl
    def gptlab_run_start(run):
        _write(run, {"event": "start", "name": run.name, "seed": run.seed,
                     "steps": run.config["train"]["steps"]})


    @gptlab.hookimpl
    def gptlab_log(run, step, metrics):
        _write(run, {"event": "log", "step": step, **dict(metrics)})


    @gptlab.hookimpl
    def gptlab_eval(run, step, metrics):
        _write(run, {"event": "eval", "step": step, **dict(metrics)})


    @gptlab.hookimpl
    def gptlab_run_end(run, summary):
        _write(run, {"event": "end", "status": summary["status"], "final_val_loss": summary.get("final_val_loss")})
'''


def test_lifecycle_hooks_see_every_logged_step(cli, tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc.update(name="hooks", plugins=["sink.py"], seeds=[0])
    doc["variants"] = {"ok": {}, "diverges": {"train": {"lr": 1.0e6, "grad_clip": None}}}
    doc["train"]["eval_every"] = 5
    exp = write_lab(tmp_path, doc, "hooks.yaml", plugins={"sink.py": SINK})
    rc, out, err = cli("run", exp, "--results-dir", tmp_path / "results", "--device", "cpu")
    assert rc == 0, err
    runs = by_variant_seed(tmp_path / "results" / "hooks")

    for (variant, seed), run_dir in runs.items():
        records = [json.loads(line) for line in (run_dir / "sink.jsonl").read_text().splitlines()]
        s = summary(run_dir)
        assert records[0] == {"event": "start", "name": variant, "seed": seed, "steps": 10}
        assert records[-1]["event"] == "end" and records[-1]["status"] == s["status"]
        assert [r["event"] for r in records].count("start") == 1
        assert [r["event"] for r in records].count("end") == 1
        logs = [{k: v for k, v in r.items() if k != "event"} for r in records if r["event"] == "log"]
        assert logs == metrics(run_dir)  # same rows, same losses
        evals = [r for r in records if r["event"] == "eval"]
        assert [(r["step"], r["val_loss"]) for r in evals] == \
            [(r["step"], r["val_loss"]) for r in metrics(run_dir) if "val_loss" in r]
    assert summary(runs["ok", 0])["status"] == "completed"
    ok_records = (runs["ok", 0] / "sink.jsonl").read_text().splitlines()
    assert len([r for r in ok_records if '"log"' in r]) == 2
    assert json.loads(ok_records[-1])["final_val_loss"] == summary(runs["ok", 0])["final_val_loss"]
    assert json.loads((runs["diverges", 0] / "sink.jsonl").read_text().splitlines()[-1])["status"] == "diverged"


def test_a_run_locked_by_another_process_is_left_to_it(tmp_path, cli):
    """Two gptlab processes on one experiment never train the same run twice."""
    import fcntl

    exp = write_lab(tmp_path, {**BASE, "seeds": [0]}, "exp.yaml")
    rc, out, err = cli("run", exp, "--results-dir", tmp_path / "res", "--dry-run")
    assert rc == 0
    from gptlab.run.experiment import load_experiment

    spec = next(s for s in load_experiment(exp).runs if s.variant == "a")
    held = tmp_path / "res" / "tiny" / spec.dir_name
    held.mkdir(parents=True)
    with open(held / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands in for the other process
        rc, out, err = cli("run", exp, "--results-dir", tmp_path / "res")
    assert rc == 0, err
    assert "left to it" in err
    assert not (held / "summary.json").exists()  # untouched: the other process owns it
    (other,) = [d for d in run_dirs(tmp_path / "res" / "tiny").values() if d != held]
    assert summary(other)["status"] == "completed"
