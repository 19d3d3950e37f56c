"""The experiment's ``tune:`` block: each variant at its own best value of one key.

Loading is checked on the Experiment (tuning runs, labels, seeds, definitions) and through
``gptlab run --dry-run`` (each bad block is one line, exit 2, nothing written). ``choose`` and
``describe`` are checked against run folders written by hand, named as the runner names them. One
tiny experiment (2 variants x 2 values x 1 tuning seed, seeds [0, 1]) is trained once per module;
``gptlab run`` again, ``--dry-run``, ``compare``, ``compare --all`` and ``runs`` are checked against
the choice recomputed here from its tuning runs' summary.json files.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from gptlab import rundir as rd
from gptlab.fmt import yaml_value
from gptlab.results.compare import compare_results, compare_table
from gptlab.results.frame import load_results
from gptlab.run.experiment import load_experiment
from gptlab.run.tuning import Choice, choose, describe, record

from helpers import make_experiment, make_run, one_line_error, pre_vs_post, run_cli, snapshot, write_lab

TRAIN = dict(steps=2, batch_size=2, eval_every=2, log_every=2, eval_batches=1)
LRS = [0.001, 0.01]
THREE = [0.001, 0.003, 0.01]


def lab(tune=None, seeds=(0, 1), **extra) -> dict:
    """The tiny pre/post experiment with seeds ``seeds`` and a tune: block (default: train.lr at LRS)."""
    return {**pre_vs_post(**TRAIN), "seeds": list(seeds),
            "tune": {"key": "train.lr", "values": LRS} if tune is None else tune, **extra}


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def box_rows(out: str) -> list[list[str]]:
    """The cells of each row of a boxed rich table (the --dry-run table)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def table_rows(out: str) -> list[str]:
    """The rows of a comparison table of more than one row: between the rule under the header and
    the first note."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("─")) + 1
    end = next(i for i, line in enumerate(lines) if "mean ± std over completed runs" in line)
    return lines[start:end]


def header(out: str) -> list[str]:
    lines = out.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("─")) - 1].split()


# -- 1. loading ---------------------------------------------------------------------------------------
def test_tuning_runs_are_variants_by_values_by_tune_seeds(tmp_path):
    exp = load_experiment(write_lab(tmp_path, lab({"key": "train.lr", "values": THREE, "seeds": [7, 9]})))
    expected = [(f"{v}@lr={yaml_value(x)}", seed, x) for v in ("a", "b") for x in THREE for seed in (7, 9)]
    assert [(s.variant, s.seed, s.train.lr) for s in exp.runs] == expected
    assert [s.variant for s in exp.runs][:3] == ["a@lr=0.001", "a@lr=0.001", "a@lr=0.003"]
    assert exp.runs == exp.tuning_runs and exp.variants == ["a", "b"] and exp.chosen == {}
    assert [s.model.to_dict()["norm_placement"] for s in exp.runs] == ["pre"] * 6 + ["post"] * 6
    assert all(s.changes["train.lr"] == s.train.lr for s in exp.runs)
    # until a value is chosen the file defines the tuning runs alone, each marked as one
    assert exp.defined == {rd.TUNING + rd.run_key(s.config_hash, s.seed): s.variant for s in exp.runs}
    assert exp.tune.to_dict() == {"key": "train.lr", "values": THREE, "seeds": [7, 9], "metric": "val_loss"}
    assert exp.warnings == []


def test_comparison_runs_share_the_tuning_config_at_their_value(tmp_path):
    exp = load_experiment(write_lab(tmp_path, lab({"key": "train.lr", "values": THREE, "seeds": [7]})))
    for variant, cands in exp.candidates.items():
        assert [c.value for c in cands] == THREE and {c.variant for c in cands} == {variant}
        for cand in cands:
            assert [(s.variant, s.seed) for s in cand.comparison] == [(variant, 0), (variant, 1)]
            (tuning,) = cand.tuning
            assert tuning.seed == 7 and tuning.train.lr == cand.value
            for spec in cand.comparison:
                assert spec.config_hash == tuning.config_hash and spec.resolved() == tuning.resolved()
        assert len({c.tuning[0].config_hash for c in cands}) == len(THREE)  # each value its own config
    # a decides 0.003, b is undecided: a's comparison runs join the runs and the definition
    choices = {"a": Choice("a", 0.003, 1, [3.0, 2.0, 4.0], 0, []), "b": Choice("b", None, None, [math.nan] * 3, 3, [])}
    tuned = exp.tuned(choices)
    a_runs = exp.candidates["a"][1].comparison
    assert tuned.runs == exp.tuning_runs + a_runs
    assert tuned.chosen == {"a": 0.003}
    assert tuned.defined == {**exp.defined, **{rd.run_key(s.config_hash, s.seed): "a" for s in a_runs}}
    assert exp.runs == exp.tuning_runs  # the loaded experiment itself is unchanged


def test_default_tune_seed_is_one_past_the_largest_seed(tmp_path):
    exp = load_experiment(write_lab(tmp_path, lab(seeds=(0, 5, 2))))
    assert exp.tune.seeds == [6]
    assert {s.seed for s in exp.runs} == {6}
    assert {s.seed for cands in exp.candidates.values() for c in cands for s in c.comparison} == {0, 5, 2}
    assert exp.warnings == []


def test_tune_seeds_that_are_also_seeds_are_a_warning(tmp_path, cli):
    path = write_lab(tmp_path, lab({"key": "train.lr", "values": LRS, "seeds": [1, 4]}))
    exp = load_experiment(path)
    assert len(exp.warnings) == 1 and f"{path}: tune.seeds and seeds share [1]:" in exp.warnings[0]
    rc, out, err = cli("run", path, "--results-dir", tmp_path / "results", "--dry-run", "--device", "cpu")
    assert rc == 0
    assert "warning:" in err and "tune.seeds and seeds share [1]" in flat(err)
    assert not (tmp_path / "results").exists()


# -- 2. bad tune blocks ----------------------------------------------------------------------------------
BAD = {  # case -> (the tune block, or the whole experiment's extra keys, the words of the one-line error)
    "unknown-tune-key": ({"kee": "train.lr", "values": LRS}, ["tune: unknown key 'kee'", "did you mean 'key'"]),
    "not-dotted": ({"key": "lr", "values": LRS}, ["tune.key must be a dotted config key", "got 'lr'"]),
    "unknown-section": ({"key": "optim.lr", "values": LRS}, ["tune.key must be a dotted config key", "got 'optim.lr'"]),
    "grid-key": ({"key": "train.lr", "values": LRS}, ["tune.key 'train.lr' is also a grid key"]),
    "one-value": ({"key": "train.lr", "values": [0.001]},
                  ["tune.values must list at least 2 values of train.lr", "got [0.001]"]),
    "values-not-a-list": ({"key": "train.lr", "values": 0.001}, ["tune.values must list at least 2 values"]),
    "duplicate-value": ({"key": "train.lr", "values": [0.001, 0.01, 0.001]}, ["tune.values lists a value twice"]),
    "unknown-metric": ({"key": "train.lr", "values": LRS, "metric": "val_los"},
                       ["tune.metric 'val_los' cannot choose a value", "did you mean 'val_loss'"]),
    "higher-is-better-metric": ({"key": "train.lr", "values": LRS, "metric": "tokens_per_s"},
                                ["tune.metric 'tokens_per_s' cannot choose a value"]),
    "empty-seeds": ({"key": "train.lr", "values": LRS, "seeds": []}, ["tune.seeds must be a non-empty list", "got []"]),
    "negative-seed": ({"key": "train.lr", "values": LRS, "seeds": [-1]}, ["tune.seeds must be", "got [-1]"]),
    "bool-seed": ({"key": "train.lr", "values": LRS, "seeds": [True]}, ["tune.seeds must be", "got [True]"]),
    "seeds-not-a-list": ({"key": "train.lr", "values": LRS, "seeds": 100}, ["tune.seeds must be", "got 100"]),
    "duplicate-seed": ({"key": "train.lr", "values": LRS, "seeds": [3, 3]}, ["tune.seeds lists a seed twice: [3, 3]"]),
    "not-a-mapping": ([0.001, 0.01], ["'tune' must be a mapping"]),
    "not-a-config-key": ({"key": "train.lrr", "values": LRS},
                         ["variant 'a' at train.lrr=0.001", "unknown train key 'lrr'", "did you mean 'lr'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_tune_block_is_one_line_and_writes_nothing(case, tmp_path, cli):
    tune, words = BAD[case]
    extra = {"grid": {"train.lr": [0.001, 0.003]}} if case == "grid-key" else {}
    path = write_lab(tmp_path, lab(tune, **extra))
    rc, out, err = cli("run", path, "--results-dir", tmp_path / "results", "--dry-run", "--device", "cpu")
    line = one_line_error(rc, err, *words)
    assert line.startswith(f"gptlab: error: {path}: ")
    assert out == "" and not (tmp_path / "results").exists()


# -- 3. choose() against run folders written by hand ----------------------------------------------------------
def tuned_lab(tmp_path, values=THREE, seeds=(7, 8)):
    """The Experiment with tune values ``values`` on tuning seeds ``seeds``, and its (empty) results folder."""
    exp = load_experiment(write_lab(tmp_path, lab({"key": "train.lr", "values": list(values), "seeds": list(seeds)})))
    exp_dir = tmp_path / "results" / exp.name
    exp_dir.mkdir(parents=True)
    return exp, exp_dir


def write_tuning_run(exp_dir: Path, spec, val, **kw) -> Path:
    """One tuning run as make_run writes it, in the folder the runner would have made for it."""
    run = make_run(exp_dir, spec.variant, spec.seed, val, chash=spec.config_hash, **kw)
    return run.rename(exp_dir / rd.run_dir_name(spec.variant, spec.config_hash, spec.seed))


def fill(exp, exp_dir: Path, losses: dict) -> None:
    """``losses``: variant -> per tune value, per tuning seed: a final val loss (completed), a dict
    of make_run arguments, or None (no run folder)."""
    for variant, per_value in losses.items():
        for cand, per_seed in zip(exp.candidates[variant], per_value, strict=True):
            for spec, entry in zip(cand.tuning, per_seed, strict=True):
                if entry is None:
                    continue
                kw = entry if isinstance(entry, dict) else {"val": entry}
                write_tuning_run(exp_dir, spec, **kw)


def test_choice_is_the_lowest_mean_over_tuning_seeds(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path)
    losses = {"a": [[2.0, 4.2], [3.0, 3.0], [3.5, 3.6]],  # 0.001 has the best single run, 0.003 the best mean
              "b": [[3.3, 3.1], [3.4, 3.4], [2.9, 3.0]]}
    fill(exp, exp_dir, losses)
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert list(choices) == ["a", "b"]
    for variant, per_value in losses.items():
        means = [statistics.mean(v) for v in per_value]
        best = min(range(len(means)), key=lambda i: (means[i], i))
        choice = choices[variant]
        assert (choice.index, choice.value, choice.waiting, choice.failed) == (best, THREE[best], 0, [])
        assert choice.decided and choice.scores == pytest.approx(means)
    per_seed_min = min(range(3), key=lambda i: min(losses["a"][i]))
    assert choices["a"].index != per_seed_min  # the case tells the mean from the best single run
    assert choices["a"].value == 0.003 and choices["b"].value == 0.01
    lines = describe(exp.tune, choices)
    means_a = [statistics.mean(v) for v in losses["a"]]
    assert lines[0] == ("a: train.lr = 0.003 (tuning val_loss "
                        + ", ".join(f"{yaml_value(x)}: {m:.4f}" for x, m in zip(THREE, means_a)) + ")")
    assert "warning" not in lines[0]  # 0.003 lies inside the grid
    assert lines[1].startswith("b: train.lr = 0.01 (tuning val_loss ") and lines[1].endswith(
        "; warning: the best value is the largest tried, so a better one may lie beyond it: extend tune.values")
    assert record(exp.tune, choices) == {**exp.tune.to_dict(), "chosen": {"a": 0.003, "b": 0.01}, "lines": lines}
    tuned = exp.tuned(choices)
    assert tuned.chosen == {"a": 0.003, "b": 0.01}
    assert [(s.variant, s.seed, s.train.lr) for s in tuned.runs[len(exp.runs):]] == [
        ("a", 0, 0.003), ("a", 1, 0.003), ("b", 0, 0.01), ("b", 1, 0.01)]


def test_the_smallest_value_is_flagged_at_the_edge(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path, seeds=(7,))
    fill(exp, exp_dir, {"a": [[1.0], [2.0], [3.0]], "b": [[2.5], [2.0], [2.5]]})
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert (choices["a"].index, choices["b"].index) == (0, 1)
    a, b = describe(exp.tune, choices)
    assert a == ("a: train.lr = 0.001 (tuning val_loss 0.001: 1.0000, 0.003: 2.0000, 0.01: 3.0000); warning: the "
                 "best value is the smallest tried, so a better one may lie beyond it: extend tune.values")
    assert b == "b: train.lr = 0.003 (tuning val_loss 0.001: 2.5000, 0.003: 2.0000, 0.01: 2.5000)"


def test_an_edge_warning_speaks_of_the_values_not_of_their_order(tmp_path):
    # values listed out of order: 0.003 is the middle of the grid, not "the smallest tried"
    exp, exp_dir = tuned_lab(tmp_path, values=[0.003, 0.001, 0.01], seeds=(7,))
    fill(exp, exp_dir, {"a": [[2.0], [3.0], [3.0]], "b": [[2.0], [3.0], [3.0]]})
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert choices["a"].value == 0.003
    assert describe(exp.tune, choices)[0] == "a: train.lr = 0.003 (tuning val_loss 0.003: 2.0000, 0.001: 3.0000, 0.01: 3.0000)"


def test_a_diverged_run_scores_inf_whatever_loss_it_recorded(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path)
    diverged = {"val": 0.5, "status": rd.DIVERGED}  # the lowest number of all, but the run diverged
    fill(exp, exp_dir, {"a": [[3.0, 3.0], [2.0, diverged], [3.2, 3.2]],
                        "b": [[{"val": None, "status": rd.DIVERGED}] * 2, [diverged, diverged], [4.0, 4.0]]})
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert choices["a"].scores == [3.0, math.inf, 3.2] and choices["a"].value == 0.001
    assert choices["b"].scores == [math.inf, math.inf, 4.0] and choices["b"].value == 0.01
    assert describe(exp.tune, choices)[0].startswith("a: train.lr = 0.001 (tuning val_loss 0.001: 3.0000, "
                                                     "0.003: diverged, 0.01: 3.2000); warning")


def test_every_value_diverged_is_still_a_choice_the_first(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path, seeds=(7,))
    gone = {"val": None, "status": rd.DIVERGED}
    fill(exp, exp_dir, {"a": [[gone]] * 3, "b": [[1.0], [1.0], [1.0]]})
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert (choices["a"].index, choices["a"].scores) == (0, [math.inf] * 3)
    assert (choices["b"].index, choices["b"].scores) == (0, [1.0] * 3)  # a tie goes to the value listed first


def test_a_tie_goes_to_the_value_listed_first(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path)
    fill(exp, exp_dir, {"a": [[3.0, 3.0], [2.5, 2.7], [2.7, 2.5]],  # equal means at 0.003 and 0.01
                        "b": [[2.0, 2.0], [3.0, 3.0], [2.0, 2.0]]})  # equal means at both edges
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert choices["a"].scores[1] == choices["a"].scores[2] < choices["a"].scores[0]
    assert (choices["a"].index, choices["a"].value) == (1, 0.003)
    assert (choices["b"].index, choices["b"].value) == (0, 0.001)


def test_a_missing_or_unfinished_run_leaves_its_variant_undecided(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path)
    running = {"val": None, "status": rd.RUNNING}  # no process holds its lock: interrupted
    fill(exp, exp_dir, {"a": [[3.0, 3.0], [2.0, 2.0], [3.0, 3.0]],
                        "b": [[3.0, None], [1.0, 1.0], [running, 3.0]]})
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert choices["a"].decided and choices["a"].value == 0.003
    b = choices["b"]
    assert (b.decided, b.value, b.index, b.waiting, b.failed) == (False, None, None, 2, [])
    assert b.scores[1] == 1.0 and math.isnan(b.scores[0]) and math.isnan(b.scores[2])
    lines = describe(exp.tune, choices)
    assert lines[1] == "b: train.lr not chosen yet: 2 tuning run(s) to finish"
    tuned = exp.tuned(choices)
    assert {s.variant for s in tuned.runs if "@" not in s.variant} == {"a"}
    assert tuned.chosen == {"a": 0.003}
    assert record(exp.tune, choices)["chosen"] == {"a": 0.003}


def test_a_failed_run_blocks_its_variant_and_is_named(tmp_path):
    exp, exp_dir = tuned_lab(tmp_path)
    failed = {"val": None, "status": rd.FAILED}
    fill(exp, exp_dir, {"a": [[3.0, 3.0], [2.0, 2.0], [3.0, 3.0]],
                        "b": [[3.0, 3.0], [1.0, failed], [3.0, 3.0]]})  # every other run finished
    choices = choose(exp.candidates, exp_dir, exp.tune)
    spec = exp.candidates["b"][1].tuning[1]
    name = rd.run_dir_name(spec.variant, spec.config_hash, spec.seed)
    b = choices["b"]
    assert (b.decided, b.value, b.failed, b.waiting) == (False, None, [name], 0)
    assert describe(exp.tune, choices)[1] == (f"b: train.lr not chosen: tuning run(s) failed ({name}); "
                                              f"fix them and run again")
    assert exp.tuned(choices).chosen == {"a": 0.003}


@pytest.mark.parametrize("damage", [{"status": 1}, {"status": "finished"}, {"variant": 5}, {"seed": "7"}],
                         ids=["status-int", "status-unknown", "variant-int", "seed-text"])
def test_a_damaged_summary_is_not_trusted(damage, tmp_path):
    exp, exp_dir = tuned_lab(tmp_path)
    # the damaged run holds the lowest loss of all: trusted, it would decide b at 0.01
    fill(exp, exp_dir, {"a": [[3.0, 3.0], [2.0, 2.0], [3.0, 3.0]],
                        "b": [[3.0, 3.0], [2.0, 2.0], [3.0, {"val": 0.1, "summary": damage}]]})
    assert rd.summary_damage(rd.read_summary(next(exp_dir.glob("b_lr=0.01__*__s8")))) is not None
    choices = choose(exp.candidates, exp_dir, exp.tune)
    assert choices["a"].value == 0.003
    assert (choices["b"].decided, choices["b"].waiting, choices["b"].failed) == (False, 1, [])


# -- 6. the tuned key is a column even when every variant chose the same value -------------------------------
def test_the_tuned_key_is_shown_when_every_variant_chose_the_same_value(tmp_path):
    exp = make_experiment(tmp_path, "exp", {"a": [1.0, 1.1], "b": [1.2, 1.3]}, b={"model": {"norm_placement": "post"}})
    for run in exp.glob("*__s*"):  # both variants trained at train.lr 0.003
        config = json.loads((run / rd.CONFIG).read_text())
        config["train"]["lr"] = 0.003
        (run / rd.CONFIG).write_text(json.dumps(config))
    df = load_results(exp)
    plain = compare_table(df)
    assert "train.lr" not in plain.columns and plain.attrs["config_cols"] == ["model.norm_placement"]
    shown = compare_table(df, show_keys=["train.lr"])
    assert shown.attrs["config_cols"] == ["model.norm_placement", "train.lr"]
    assert list(shown["train.lr"]) == [0.003, 0.003] and list(shown["variant"]) == ["a", "b"]
    # a key no run has, or one that differs inside a row, is not forced in
    assert compare_table(df, show_keys=["train.nope"]).attrs["config_cols"] == ["model.norm_placement"]
    # compare_results takes the key from experiment.json's tuning record, with its lines for the notes
    meta = json.loads((exp / rd.EXPERIMENT).read_text())
    lines = ["a: train.lr = 0.003 (tuning val_loss ...)", "b: train.lr = 0.003 (tuning val_loss ...)"]
    meta["tuning"] = {"key": "train.lr", "values": [0.001, 0.003, 0.01], "seeds": [2], "metric": "val_loss",
                      "chosen": {"a": 0.003, "b": 0.003}, "lines": lines}
    (exp / rd.EXPERIMENT).write_text(json.dumps(meta))
    (table,) = compare_results(exp)
    assert table.attrs["config_cols"] == ["model.norm_placement", "train.lr"]
    assert list(table["train.lr"]) == [0.003, 0.003] and table.attrs["tuning"] == lines


# -- 4 and 5. a tiny experiment trained end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny experiment (tuning seed 2, seeds [0, 1]) trained once by `gptlab run`: its file, its
    results folder and the run's (rc, stdout, stderr). Tests that change the results copy them."""
    root = tmp_path_factory.mktemp("tune")
    path = write_lab(root, lab())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "200")
        mp.chdir(root)
        result = run_cli(None, "run", path, "--results-dir", root / "results", "--device", "cpu")
    assert result[0] == 0, result[2]
    return path, root / "results", result


def tuning_summaries(exp, exp_dir: Path) -> dict:
    """variant -> [final val loss per tune value] as the tuning runs' summary.json files hold them."""
    out = {}
    for variant, cands in exp.candidates.items():
        out[variant] = []
        for cand in cands:
            (spec,) = cand.tuning
            summary = json.loads((exp_dir / rd.run_dir_name(spec.variant, spec.config_hash, spec.seed)
                                  / rd.SUMMARY).read_text())
            assert summary["status"] == rd.COMPLETED
            out[variant].append(summary["final_val_loss"])
    return out


def expected(exp, exp_dir: Path) -> tuple[dict, dict]:
    """(variant -> index of the chosen value, variant -> the line the notes give it), from the summaries."""
    losses = tuning_summaries(exp, exp_dir)
    index = {v: min(range(len(LRS)), key=lambda i: (losses[v][i], i)) for v in losses}
    lines = {}
    for v, i in index.items():
        side = "smallest" if i == 0 else "largest"  # two values: the choice is always at an edge
        lines[v] = (f"{v}: train.lr = {yaml_value(LRS[i])} (tuning val_loss "
                    + ", ".join(f"{yaml_value(x)}: {s:.4f}" for x, s in zip(LRS, losses[v]))
                    + f"); warning: the best value is the {side} tried, so a better one may lie beyond it: "
                      f"extend tune.values")
    return index, lines


def folders(exp, index: dict) -> set:
    tuning = {s.dir_name for s in exp.tuning_runs}
    compared = {s.dir_name for v, i in index.items() for s in exp.candidates[v][i].comparison}
    return tuning | compared


def test_the_comparison_runs_train_at_the_value_the_tuning_runs_chose(trained):
    path, results, (rc, out, err) = trained
    exp, exp_dir = load_experiment(path), results / "tiny"
    index, lines = expected(exp, exp_dir)
    assert {p.name for p in exp_dir.iterdir()} == folders(exp, index) | {rd.EXPERIMENT}
    assert {v: c.index for v, c in choose(exp.candidates, exp_dir, exp.tune).items()} == index
    for v, i in index.items():
        (tuning,) = exp.candidates[v][i].tuning
        tuning_config = yaml.safe_load((exp_dir / tuning.dir_name / rd.CONFIG).read_text())
        for seed in (0, 1):
            run = exp_dir / rd.run_dir_name(v, tuning.config_hash, seed)
            config = yaml.safe_load((run / rd.CONFIG).read_text())
            assert config["train"]["lr"] == LRS[i] and config["config_hash"] == tuning.config_hash
            assert {**config, "variant": None, "seed": None} == {**tuning_config, "variant": None, "seed": None}
            assert json.loads((run / rd.SUMMARY).read_text())["status"] == rd.COMPLETED
    meta = json.loads((exp_dir / rd.EXPERIMENT).read_text())
    assert meta["tuning"]["chosen"] == {v: LRS[i] for v, i in index.items()}
    assert meta["tuning"]["lines"] == [lines["a"], lines["b"]]
    # the table: one row per variant at its value, the tuned key shown, each choice in the notes
    assert header(out)[:3] == ["variant", "norm_placement", "lr"]
    assert [row.split()[:4] for row in table_rows(out)] == [
        ["a", "pre", yaml_value(LRS[index["a"]]), "2/2"], ["b", "post", yaml_value(LRS[index["b"]]), "2/2"]]
    assert "@lr=" not in out
    assert "tuned per variant (the lowest tuning metric wins; tuning runs: gptlab compare --all):" in out
    assert lines["a"] in flat(out) and lines["b"] in flat(out)
    assert "tiny: 4 runs on cpu" in flat(err)  # the tuning runs, then the comparison runs they decided
    assert err.count("completed val") == 8


def test_a_second_run_trains_nothing_and_prints_the_same_table(trained, tmp_path, cli):
    path, results, (_, first, _) = trained
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    before = snapshot(copy / "tiny")
    rc, out, err = cli("run", path, "--results-dir", copy, "--device", "cpu")
    assert rc == 0
    assert "tiny: 8 runs on cpu" in flat(err) and "(8 finished runs kept)" in flat(err)
    assert "completed val" not in err
    after = snapshot(copy / "tiny")
    assert set(after) == set(before)
    assert {k for k in after if after[k] != before[k]} == {rd.EXPERIMENT}  # rewritten, to the same content
    assert json.loads(after[rd.EXPERIMENT][0]) == json.loads(before[rd.EXPERIMENT][0])
    assert out == first


def test_compare_shows_the_rows_of_the_run_and_all_adds_the_tuning_runs(trained, cli):
    path, results, (_, first, _) = trained
    exp, exp_dir = load_experiment(path), results / "tiny"
    index, lines = expected(exp, exp_dir)
    rc, out, err = cli("compare", exp_dir)
    assert rc == 0 and err == ""
    assert table_rows(out) == table_rows(first)
    assert lines["a"] in flat(out) and lines["b"] in flat(out)
    assert "4 tuning run(s) of the tune: block not shown (--all shows them)" in flat(out)
    rc, out, err = cli("compare", exp_dir, "--all")
    assert rc == 0
    rows = {row.split()[0]: row for row in table_rows(out)}
    labels = [s.variant for s in exp.tuning_runs]
    assert sorted(rows) == sorted(labels + ["a", "b"])
    for label in labels:  # variant@lr=value, at that value, made with the tune: block
        variant, value = label.split("@lr=")
        assert rows[label].split()[1:5] == [("pre" if variant == "a" else "post"), value, "tune:", "block"]
    for v in ("a", "b"):
        assert rows[v].split()[1:4] == [("pre" if v == "a" else "post"), yaml_value(LRS[index[v]]), "2/2"]
        assert "tune: block" not in rows[v]
    assert "made with: rows that are not the comparison the file defines (tune: block" in flat(out)
    assert "not shown" not in out


def test_compare_does_not_call_the_hidden_tuning_runs_overrides(trained, cli):
    # the 4 hidden runs are the file's own tuning runs, not runs of overrides or of an older file
    path, results, _ = trained
    rc, out, err = cli("compare", results / "tiny")
    assert rc == 0 and "4 tuning run(s) of the tune: block not shown" in flat(out)
    note = flat(out)[flat(out).index("4 tuning run(s)"):]
    assert "command-line overrides or by an earlier version" not in note, note
    assert "tune" in note, note


def test_runs_marks_the_tuning_runs(trained, cli):
    path, results, _ = trained
    rc, out, err = cli("runs", results / "tiny", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert len(rows) == 8
    made = {(r["variant"], r["seed"]): r["made_with"] for r in rows}
    assert made == {**{(s.variant, 2): "the file's tune: block" for s in load_experiment(path).tuning_runs},
                    **{(v, seed): "the file" for v in ("a", "b") for seed in (0, 1)}}
    rc, out, err = cli("runs", "--results-dir", results)
    assert rc == 0 and out.count("the file's tune: block") == 4 and "8 runs" in out


def test_dry_run_before_any_run_lists_the_tuning_runs(trained, tmp_path, cli):
    path, _, _ = trained
    exp = load_experiment(path)
    rc, out, err = cli("run", path, "--results-dir", tmp_path / "fresh", "--dry-run", "--device", "cpu")
    assert rc == 0 and err == ""
    assert "tiny: 4 runs (dry run, nothing trained)" in out
    assert [r[:4] for r in box_rows(out)] == [[s.variant, "2", s.config_hash, "run"] for s in exp.tuning_runs]
    text = flat(out)
    assert ("tune: each variant trains at train.lr = 0.001, 0.01 on seed(s) 2; the value with the lowest "
            "val_loss is the one its seeds 0, 1 train at") in text
    assert "a: train.lr not chosen yet: 2 tuning run(s) to finish" in text
    assert "b: train.lr not chosen yet: 2 tuning run(s) to finish" in text
    assert ("then 4 comparison run(s) (2 per variant: a, b), planned once their tuning runs have finished") in text
    assert not (tmp_path / "fresh").exists()


def test_a_lost_tuning_run_undecides_its_variant_until_it_is_trained_again(trained, tmp_path, cli):
    path, results, (_, first, _) = trained
    exp = load_experiment(path)
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    exp_dir = copy / "tiny"
    index, lines = expected(exp, exp_dir)
    lost = exp.candidates["b"][1 - index["b"]].tuning[0]  # the value b did not choose
    lost_summary = json.loads((exp_dir / lost.dir_name / rd.SUMMARY).read_text())
    shutil.rmtree(exp_dir / lost.dir_name)
    before = snapshot(exp_dir)

    rc, out, err = cli("run", path, "--results-dir", copy, "--dry-run", "--device", "cpu")
    assert rc == 0 and err == ""
    a_runs = exp.candidates["a"][index["a"]].comparison
    assert [r[:4] for r in box_rows(out)] == (
        [[s.variant, "2", s.config_hash, "run" if s == lost else "skip"] for s in exp.tuning_runs]
        + [["a", str(s.seed), s.config_hash, "skip"] for s in a_runs])
    text = flat(out)
    assert "tiny: 6 runs (dry run, nothing trained)" in text
    assert lines["a"] in text
    assert "b: train.lr not chosen yet: 1 tuning run(s) to finish" in text
    assert "then 2 comparison run(s) (2 per variant: b), planned once their tuning runs have finished" in text
    assert snapshot(exp_dir) == before  # the dry run wrote nothing

    rc, out, err = cli("run", path, "--results-dir", copy, "--device", "cpu")
    assert rc == 0
    assert "tiny: 6 runs on cpu" in flat(err) and "(5 finished runs kept)" in flat(err)
    assert err.count("completed val") == 1 and f"[tiny {lost.variant} s2] completed val" in err
    after = snapshot(exp_dir)
    changed = {k for k in after if after.get(k) != before.get(k)}
    assert {k.split("/")[0] for k in changed} == {lost.dir_name, rd.EXPERIMENT}  # the lost run alone trained
    retrained = json.loads((exp_dir / lost.dir_name / rd.SUMMARY).read_text())
    assert retrained["status"] == rd.COMPLETED
    assert retrained["final_val_loss"] == lost_summary["final_val_loss"]  # the same run, bit for bit
    assert expected(exp, exp_dir) == (index, lines)
    assert {p.name for p in exp_dir.iterdir()} == folders(exp, index) | {rd.EXPERIMENT}
    assert out == first


def test_a_run_with_overrides_keeps_the_tuning_runs_out_of_its_table(trained, tmp_path, cli):
    # with a model/data/train override the file defines none of these runs; the table still shows
    # only the comparison rows, not the tuning rows beside them
    path, _, _ = trained
    rc, out, err = cli("run", path, "train.eval_batches=2", "--results-dir", tmp_path / "results", "--device", "cpu")
    assert rc == 0 and err.count("completed val") == 8
    assert [row.split()[0] for row in table_rows(out)] == ["a", "b"]


def test_warnings_are_given_once_per_variant_not_once_per_tune_value(tmp_path):
    # a warmup as long as the run: one warning per variant, not one per tune value
    exp = load_experiment(write_lab(tmp_path, lab()), ["train.warmup_steps=5"])
    assert len(exp.warnings) == 2 and len(set(exp.warnings)) == 2
    assert "variant 'a': train.warmup_steps (5)" in exp.warnings[0]
    assert "variant 'b': train.warmup_steps (5)" in exp.warnings[1]
