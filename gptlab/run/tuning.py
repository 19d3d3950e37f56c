"""Each variant at its own best value of one key: the experiment's ``tune:`` block.

Every variant trains at every value of ``tune.key`` on the tuning seeds; the value whose runs have
the lowest mean ``tune.metric`` is that variant's, and the experiment's seeds train at it (the
comparison runs). Tuning runs are ordinary runs (their own folders, skipped when finished, resumed
when cut short). The choice is never stored as a decision: it is read again from the tuning runs'
summaries whenever it is needed, so ``gptlab run``, ``--dry-run`` and ``gptlab compare`` agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, did_you_mean
from ..fmt import yaml_value
from .. import rundir as rd
from ..config.run import check_block, check_seeds

TUNE_KEYS = ("key", "values", "seeds", "metric")
#: what a tuning run is judged by (lower is better) -> the summary.json number it reads
TUNE_METRICS = {"val_loss": "final_val_loss", "val_bpb": "final_val_bpb", "train_loss": "final_train_loss",
                "best_val_loss": "best_val_loss"}


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` block: the dotted key tuned, its values, the tuning seeds and the metric."""

    key: str
    values: list
    seeds: list
    metric: str = "val_loss"

    def to_dict(self) -> dict:
        return {"key": self.key, "values": list(self.values), "seeds": list(self.seeds), "metric": self.metric}


@dataclass(frozen=True)
class Candidate:
    """One variant at one value of the tuned key: its tuning runs (one per tuning seed) and the
    comparison runs it gets if the value is chosen (one per experiment seed)."""

    variant: str
    value: Any
    tuning: list
    comparison: list


@dataclass(frozen=True)
class Choice:
    """What the tuning runs of one variant say: the chosen value (None until every tuning run has
    finished), the mean metric at each value (inf where a run diverged) and what is missing."""

    variant: str
    value: Any
    index: Optional[int]
    scores: list
    waiting: int  # tuning runs not finished yet (not run, running, interrupted)
    failed: list  # run folder names of tuning runs that failed

    @property
    def decided(self) -> bool:
        return self.index is not None

    def edge(self, values: list) -> Optional[str]:
        """'smallest' or 'largest' when the chosen value is at that end of the grid (by value when
        the values are numbers, else by their order), else None."""
        if not self.decided:
            return None
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        order = sorted(range(len(values)), key=lambda i: values[i]) if numbers else list(range(len(values)))
        return "smallest" if self.index == order[0] else "largest" if self.index == order[-1] else None


def parse_tune(raw: Any, seeds: list, grid_keys: list, sections: tuple, where: str) -> Optional[TuneConfig]:
    """The checked ``tune:`` block, or None when the experiment has none."""
    if raw is None:
        return None
    example = "tune: {key: train.lr, values: [1e-3, 2e-3, 4e-3], seeds: [100], metric: val_loss}"
    check_block(raw, "tune", TUNE_KEYS, example, where)
    key = raw.get("key")
    if not isinstance(key, str) or "." not in key or key.split(".")[0] not in sections:
        raise ConfigError(f"{where}: tune.key must be a dotted config key such as train.lr, got {key!r}")
    if key in grid_keys:
        raise ConfigError(f"{where}: tune.key '{key}' is also a grid key; tune it or sweep it, not both")
    values = raw.get("values")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError(f"{where}: tune.values must list at least 2 values of {key} to choose from, got {values!r}")
    if len({yaml_value(v) for v in values}) != len(values):
        raise ConfigError(f"{where}: tune.values lists a value twice: {values}")
    tune_seeds = check_seeds(raw.get("seeds", [max(seeds) + 1]), "tune.seeds", "[100]", where)
    metric = raw.get("metric", "val_loss")
    if metric not in TUNE_METRICS:
        raise ConfigError(f"{where}: tune.metric '{metric}' cannot choose a value{did_you_mean(str(metric), TUNE_METRICS)}; "
                          f"metrics (lower is better): {', '.join(TUNE_METRICS)}")
    return TuneConfig(key, list(values), list(tune_seeds), metric)


def overlap_warning(tune: TuneConfig, seeds: list, where: str) -> Optional[str]:
    shared = sorted(set(tune.seeds) & set(seeds))
    if not shared:
        return None
    return (f"{where}: tune.seeds and seeds share {shared}: the chosen value's own noise on those seeds favours it "
            f"in the table; use tuning seeds the comparison does not (the default is one past the largest seed)")


def tuning_label(variant: str, key: str, value: Any) -> str:
    """The label of a variant's tuning runs at one value, e.g. ``pre_ln@lr=0.002``."""
    return f"{variant}@{key.split('.')[-1]}={yaml_value(value)}"


def choose(candidates: dict, exp_dir: Path, tune: TuneConfig) -> dict[str, Choice]:
    """Each variant's choice, read from its tuning runs' summaries under ``exp_dir``. A variant is
    decided once every tuning run has finished (a diverged run scores inf: that value is never
    chosen unless all diverge); ties go to the value listed first."""
    column = TUNE_METRICS[tune.metric]
    out = {}
    for variant, cands in candidates.items():
        scores, waiting, failed = [], 0, []
        for cand in cands:
            values = []
            for spec in cand.tuning:
                run_dir = rd.find_run_dir(exp_dir, spec.config_hash, spec.seed)
                summary = rd.read_summary(run_dir) if run_dir is not None else None
                if summary is not None and rd.summary_damage(summary):
                    summary = None  # a damaged summary is never trusted: the run counts as not finished
                status = rd.run_status(run_dir, summary) if run_dir is not None else None
                if status == rd.FAILED:
                    failed.append(run_dir.name)
                elif status not in rd.FINISHED:
                    waiting += 1
                else:
                    value = summary.get(column)
                    ok = status == rd.COMPLETED and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value)
                    values.append(float(value) if ok else math.inf)
            scores.append(sum(values) / len(values) if values and len(values) == len(cand.tuning) else math.nan)
        index = None
        if not waiting and not failed:
            index = min(range(len(scores)), key=lambda i: (scores[i], i))
        out[variant] = Choice(variant, cands[index].value if index is not None else None, index, scores,
                              waiting, failed)
    return out


def chosen_runs(candidates: dict, choices: dict) -> list:
    """The comparison runs of every decided variant, in the experiment's order."""
    return [spec for variant, cands in candidates.items() if choices[variant].decided
            for spec in cands[choices[variant].index].comparison]


def describe(tune: TuneConfig, choices: dict) -> list[str]:
    """One line per variant for tables and --dry-run: the value chosen and the metric at each
    value, or what the choice still waits for; a best value at the grid's edge is flagged."""
    key = tune.key
    lines = []
    for variant, choice in choices.items():
        scores = ", ".join(f"{yaml_value(v)}: " + ("diverged" if s == math.inf else "-" if math.isnan(s) else f"{s:.4f}")
                           for v, s in zip(tune.values, choice.scores))
        if choice.failed:
            lines.append(f"{variant}: {key} not chosen: tuning run(s) failed ({', '.join(choice.failed)}); "
                         f"fix them and run again")
        elif not choice.decided:
            lines.append(f"{variant}: {key} not chosen yet: {choice.waiting} tuning run(s) to finish")
        else:
            side, edge = choice.edge(tune.values), ""
            if side:
                edge = (f"; warning: the best value is the {side} tried, so a better one may lie beyond it: "
                        f"extend tune.values")
            lines.append(f"{variant}: {key} = {yaml_value(choice.value)} (tuning {tune.metric} {scores}){edge}")
    return lines


def record(tune: TuneConfig, choices: dict) -> dict:
    """What experiment.json keeps of the tuning, for tables made later without the YAML."""
    return {**tune.to_dict(), "chosen": {v: c.value for v, c in choices.items() if c.decided},
            "lines": describe(tune, choices)}
