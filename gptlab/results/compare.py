"""Aggregate runs into one row per group: the DataFrame every ``gptlab compare`` format comes from.

Statistics. A group's metric is the mean ± sample std over its *completed* runs; diverged, failed,
interrupted and running runs are counted in their own columns and never enter a mean (a NaN loss
or a half-trained model is not a sample of the same thing). The difference to the baseline gets a
95% Welch interval (``stats.welch_ci``) and ``significant`` when it excludes zero. Fewer than
``SMALL_N`` seeds per arm is flagged by the printed table: with 2 seeds each, "both beat both"
happens by chance 1 time in 6.

Only config keys that differ between runs become columns. Nothing here prints: the CLI
(``gptlab.cli.table``) formats this DataFrame for people, and csv/json are the DataFrame itself,
so every number a table shows can be read back with pandas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pandas as pd

from ..errors import ConfigError, did_you_mean
from .frame import META, load_results, read_metrics
from .ladder import ladder_lines, ladder_parts, scale_record
from ..config.run import EVALS, SECTIONS
from ..rundir import COMPLETED, METRIC_ALIASES, STATUSES, SUMMARY_METRICS, length_multiple, read_experiment
from .stats import welch_ci
from .termplot import sparkline

__all__ = ["ALIASES", "EXPORTS", "MEANS", "SMALL_N", "Group", "cell", "cell_text", "compare_results", "compare_table",
           "eval_columns", "experiment_blocks", "export", "group_runs", "higher_is_better", "mean_curve",
           "metric_values", "resolve_by", "welch_ci"]

ALIASES = METRIC_ALIASES
LOGGED_AS = {"final_val_loss": "val_loss", "final_val_bpb": "val_bpb", "final_train_loss": "train_loss"}  # names in metrics.jsonl
MEANS = ("best_val_loss", "best_val_step", "final_train_loss", "tokens_per_s", "mfu", "parameters",
         "active_parameters", "peak_memory", "memory_estimate", "wall_time_s")
SMALL_N = 3  # fewer completed seeds than this and a difference is an anecdote
EXPORTS = ("csv", "json")  # formats that are the DataFrame itself


@dataclass
class Group:
    """Runs that form one table row: ``label`` is what the table shows; --baseline matches the
    label, or ``name`` (the variant, or the --by values) when only one row has it."""

    label: str
    keys: dict
    index: list = field(default_factory=list)
    name: Optional[str] = None


MAX_SPLIT = 6  # more config keys than this splitting a --by group: the table would be unreadable


#: metric names (their last part) where a larger value is the better one: accuracies and
#: throughput; every other metric (losses, bits per byte, standard errors) is better when smaller
HIGHER_IS_BETTER = ("tokens_per_s", "mfu", "accuracy", "acc")


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better: what a verdict's "better"/"worse" and a Δ's sign mean.
    An eval's accuracy (``hellaswag_acc``, read at a step or a budget too) is; its ``_stderr`` is not."""
    return any(str(metric).split("@")[0].endswith(h) for h in HIGHER_IS_BETTER)


# -- grouping and metric lookup ----------------------------------------------------------------
def config_columns(df: pd.DataFrame) -> list[str]:
    """The runs' config as columns: model/data/train keys, and each eval (``evals.hellaswag``) with its options."""
    return [c for c in df.columns if c.split(".")[0] in (*SECTIONS, EVALS) and "." in c]


def eval_columns(df: pd.DataFrame) -> list[str]:
    """The eval metrics the runs report (``hellaswag_acc``, ...), in the order they first appear: each
    run's summary names its own in ``eval_metrics``."""
    import json

    out: dict[str, None] = {}
    for text in (df["eval_metrics"].dropna() if "eval_metrics" in df.columns else ()):
        try:
            names = json.loads(text) if isinstance(text, str) else text
        except ValueError:
            continue
        for name in names if isinstance(names, list) else ():
            if isinstance(name, str) and name in df.columns:
                out.setdefault(name)
    return list(out)


def resolve_by(df: pd.DataFrame, by: Any) -> list[str]:
    """Column names for --by; a unique suffix such as ``position`` means ``model.position``."""
    if by is None or by == "" or by == []:
        return []
    keys = [k.strip() for k in (by.split(",") if isinstance(by, str) else by) if str(k).strip()]
    if keys == ["variant"]:
        return []
    candidates = config_columns(df) + ["experiment", "variant"]
    out = []
    for key in keys:
        matches = [key] if key in df.columns else [c for c in config_columns(df) if c.endswith("." + key)]
        if len(matches) != 1:
            hint = did_you_mean(key, candidates)
            raise ConfigError(f"--by: unknown config key '{key}'{hint}; group by dotted keys such as "
                              f"model.position or model.norm_placement" if not matches else
                              f"--by: '{key}' is ambiguous ({', '.join(matches)}); use the full key")
        out.append(matches[0])
    return out


def group_runs(df: pd.DataFrame, by_keys: list[str]) -> list[Group]:
    """Groups in order of first appearance (load_results orders runs as the experiment declares them).

    Only seeds are ever pooled. The default group is one variant at one config hash, so runs of an
    edited YAML or a CLI override never get averaged with the others (the label then carries the
    hash), and variants of merged experiments stay apart (the label carries the experiment). With
    ``by_keys``, every other key whose value differs inside a --by group (the experiment included)
    becomes a group key too, so those runs are separate rows that show what sets them apart.
    """
    groups: dict[tuple, Group] = {}
    if by_keys:
        keys = by_keys + split_keys(df, by_keys)
        # a list, not Series.map: pandas would turn cell()'s None back into NaN, and NaN != NaN as a key
        for pos, key in enumerate(zip(*([cell(v) for v in df[k]] for k in keys))):
            label = ",".join(cell_text(v) for v in key)
            name = ",".join(cell_text(v) for v in key[:len(by_keys)])
            groups.setdefault(key, Group(label, dict(zip(keys, key)), name=name)).index.append(pos)
        return list(groups.values())
    merged = df["experiment"].nunique(dropna=False) > 1
    hashes = df.groupby(["experiment", "variant"], dropna=False)["config_hash"].nunique(dropna=False)
    for pos, (exp, variant, chash) in enumerate(zip(df["experiment"], df["variant"], df["config_hash"])):
        name = str(variant)
        if hashes.get((exp, variant), 1) > 1:
            name += f"#{str(chash)[:6]}"
        label = f"{exp}/{name}" if merged else name
        keys = {"experiment": exp, "variant": name} if merged else {"variant": name}
        groups.setdefault((exp, variant, chash), Group(label, keys, name=str(variant))).index.append(pos)
    return list(groups.values())


def split_keys(df: pd.DataFrame, by_keys: list[str]) -> list[str]:
    """Keys besides ``by_keys`` whose value differs among runs that share the --by values."""
    text = {c: df[c].map(cell_text) for c in ["experiment", *config_columns(df)] if c not in by_keys}
    by = df[by_keys].map(cell_text).apply(tuple, axis=1) if len(df) else pd.Series(dtype=object)
    out = [c for c, col in text.items() if col.groupby(by).nunique().max() > 1]
    if len(out) > MAX_SPLIT:
        raise ConfigError(f"--by {','.join(by_keys)} would pool runs whose config differs in {len(out)} other keys "
                          f"({', '.join(out)}); compare fewer experiments at once or add the keys that matter to --by")
    return out


#: what ``--at AXIS=VALUE`` reads a validation curve against: axis -> metrics.jsonl column
BUDGET_AXES = {"flops": "flops", "tokens": "tokens", "time": "time_s"}


def parse_budget(text: str) -> tuple[str, float]:
    """``flops=3e13`` -> ("flops", 3e13); ConfigError naming the fix for anything else."""
    axis, sep, value = str(text).partition("=")
    fix = "write --at flops=3e13, --at tokens=2e6 or --at time=60 (seconds of training)"
    if not sep or axis not in BUDGET_AXES:
        raise ConfigError(f"--at {text!r}: unknown budget{did_you_mean(axis, BUDGET_AXES)}; {fix}")
    try:
        budget = float(value)
    except ValueError:
        raise ConfigError(f"--at {text!r}: {value!r} is not a number; {fix}") from None
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--at {text!r}: the budget must be a finite number > 0; {fix}")
    return axis, budget


def _at_budget(m: pd.DataFrame, key: str, axis: str, budget: float,
               flops_per_token: float) -> tuple[float, Optional[str]]:
    """``key``'s curve read at ``budget`` on ``axis``: linear between the two evaluations around it,
    never extrapolated; (nan, why) before the first evaluation, past the last, or without the axis."""
    column = BUDGET_AXES[axis]
    if key not in m.columns:
        return math.nan, f"no {key} logged"
    have = m[m[key].notna()]
    if column in have.columns and have[column].notna().all():
        xs = have[column].to_numpy(dtype=float)
    elif axis == "flops" and "tokens" in have.columns and flops_per_token > 0:  # runs made before rows had flops
        xs = have["tokens"].to_numpy(dtype=float) * flops_per_token
    else:
        return math.nan, f"its metrics.jsonl has no {column} (made before gptlab logged it)"
    ys = have[key].to_numpy(dtype=float)
    if not len(xs) or budget < xs[0]:
        return math.nan, "the budget comes before its first evaluation"
    if budget > xs[-1]:
        return math.nan, "the budget is past its last evaluation"
    i = int(np.searchsorted(xs, budget))
    if xs[i] == budget or i == 0:
        return float(ys[i]), None
    t = (budget - xs[i - 1]) / (xs[i] - xs[i - 1])
    return float(ys[i - 1] + t * (ys[i] - ys[i - 1])), None


def budget_values(df: pd.DataFrame, metric: str, at: tuple[str, float]) -> tuple[pd.Series, pd.Series, str]:
    """Per-run values of a logged ``metric`` at the budget ``at`` (axis, value), the reason for each
    n/a, and the label (``val_loss@flops=3e+13``)."""
    axis, budget = at
    key = LOGGED_AS.get(ALIASES.get(metric, metric), metric)
    fpt = pd.to_numeric(df["flops_per_token"], errors="coerce") if "flops_per_token" in df.columns else None
    values, reasons, logged = [], [], set()
    for i, run_dir in enumerate(df["run_dir"]):
        per_token = float(fpt.iloc[i]) if fpt is not None and math.isfinite(fpt.iloc[i]) else 0.0
        metrics = read_metrics(run_dir)
        logged |= set(metrics.columns)
        value, why = _at_budget(metrics, key, axis, budget, per_token)
        values.append(value)
        reasons.append(why)
    if key not in logged:  # a summary-only number (best_val_loss) has no curve to read
        curves = sorted(logged - {"step", "tokens", "flops", "time_s", "tokens_per_s", "lr"})
        raise ConfigError(f"--at reads a curve from metrics.jsonl, and no run logged '{metric}' there; "
                          f"curves: {', '.join(curves) or 'none'}")
    return (pd.Series(values, index=df.index, dtype=float), pd.Series(reasons, index=df.index, dtype=object),
            f"{metric}@{axis}={budget:g}")


def _budget_note(label: str, index: list, done: np.ndarray, reasons: pd.Series) -> str:
    """'val_loss@flops=3e+13: 2 of 3 seeds reach this budget (1: ...)' for a row some seeds miss."""
    missed = [reasons.iloc[i] for i in index if done[i] and reasons.iloc[i]]
    runs = sum(1 for i in index if done[i])
    if not missed:
        return ""
    why = "; ".join(f"{missed.count(r)}: {r}" for r in dict.fromkeys(missed)).replace("; ", ", ")
    return f"{label}: {runs - len(missed)} of {runs} completed seeds reach this budget ({why})"


def metric_values(df: pd.DataFrame, metric: str, at_step: Optional[int] = None) -> tuple[pd.Series, str]:
    """Per-run values of ``metric`` and the label to show for it.

    Summary values come first (aliases: val_loss -> final_val_loss, train_loss -> final_train_loss);
    load_results already filled in the last logged value of plugin metrics. With ``at_step`` the
    value logged at that step in metrics.jsonl is used instead.
    """
    name = str(metric)
    col = ALIASES.get(name, name)
    if at_step is None:
        known = _metric_columns(df)
        if col in df.columns and (name in ALIASES or col in MEANS or col in SUMMARY_METRICS):
            return pd.to_numeric(df[col], errors="coerce").astype(float), name  # text where a number belongs: n/a
        if col not in df.columns and (name in ALIASES or col in MEANS):
            # a standard metric no run reached (every run failed early): all n/a, not an error
            return pd.Series(math.nan, index=df.index, dtype=float), name
        if col not in known:
            raise ConfigError(f"unknown metric '{name}'{did_you_mean(name, list(ALIASES) + known)}; "
                              f"metrics: {', '.join(list(ALIASES) + known)}")
        return pd.to_numeric(df[col], errors="coerce").astype(float), name
    key = LOGGED_AS.get(col, col)
    values, logged, steps = [], set(), set()
    for run_dir in df["run_dir"]:
        m = read_metrics(run_dir)
        logged |= set(m.columns) - {"step"}
        if key in m.columns and "step" in m.columns:
            have = m[m[key].notna()]
            steps |= {int(s) for s in have["step"]}
            hit = have.loc[have["step"] == at_step, key]
            values.append(float(hit.iloc[-1]) if len(hit) else math.nan)
        else:
            values.append(math.nan)
    if key not in logged:
        raise ConfigError(f"--at-step: no run logged '{key}' in metrics.jsonl{did_you_mean(key, logged)}; "
                          f"logged: {', '.join(sorted(logged)) or 'nothing'}")
    if all(math.isnan(v) for v in values):
        shown = ", ".join(map(str, sorted(steps)[:20]))
        raise ConfigError(f"--at-step {at_step}: no run logged {key} at that step; logged steps: {shown}")
    return pd.Series(values, index=df.index, dtype=float), f"{name}@step{at_step}"


def _metric_columns(df: pd.DataFrame) -> list[str]:
    skip = set(META) | set(config_columns(df))
    return [c for c in df.columns if c not in skip and not c.startswith(("notes.", "versions."))
            and (pd.api.types.is_numeric_dtype(df[c]) or pd.to_numeric(df[c], errors="coerce").notna().any()
                 or df[c].isna().all())]


def mean_curve(run_dirs: Iterable[str], key: str) -> pd.Series:
    """The mean over runs of ``key`` at each logged step (runs missing a step are left out there)."""
    frames = []
    for run_dir in run_dirs:
        m = read_metrics(run_dir)
        if key in m.columns and "step" in m.columns:
            frames.append(m[["step", key]].apply(pd.to_numeric, errors="coerce").dropna())
    if not frames:
        return pd.Series(dtype=float)
    return pd.concat(frames).groupby("step")[key].mean()


# -- the table ---------------------------------------------------------------------------------
def compare_table(df: pd.DataFrame, by: Any = None, baseline: Optional[str] = None, metric: str = "val_loss",
                  at_step: Optional[int] = None, sort: Optional[str] = None,
                  at: Optional[tuple[str, float]] = None, show_keys: Iterable[str] = ()) -> pd.DataFrame:
    """One row per group (default: per variant, seeds aggregated), the source of every format.

    Columns, in this order: the group keys; config keys that differ between runs (when constant
    within each group); n (values in the mean) and n_total; ``<metric>_mean`` and ``_std``; delta
    to the baseline with ``delta_ci_low/high`` (95% Welch) and ``significant``; ``baseline``;
    best_val_loss and best_val_step (median); final_train_loss; tokens_per_s, mfu, parameters,
    peak_memory and wall_time_s means; ``val_loss@Nx`` means; each eval metric's mean (``hellaswag_acc``,
    ``attrs['eval_cols']``); ``n_<status>`` counts; ``notes`` (why an
    extrapolation is missing); ``curve`` (sparkline of the mean val loss, or train loss when val
    was evaluated fewer than 3 times); ``defined``, ``overrides``, ``tuning`` (``_made_with``). ``at``
    (axis, budget): the metric read off each run's curve at that many FLOPs, tokens or seconds of
    training (``budget_values``); a row some seeds do not reach says so in ``notes``. ``show_keys``:
    config keys shown as columns even when every row has the same value (a tuned key).
    ``table.attrs`` records the choices for the renderers.
    Default baseline: the experiment's ``compare.baseline``, else the first group.
    """
    if df is None or len(df) == 0:
        raise ConfigError("no runs to compare")
    df = df.reset_index(drop=True)
    by_keys = resolve_by(df, by)
    if at is not None and at_step is not None:
        raise ConfigError("--at and --at-step both pick where to read the metric; give one")
    _check_units(df, metric or "val_loss")
    reasons = None
    if at is not None:
        values, reasons, label = budget_values(df, metric or "val_loss", at)
    else:
        values, label = metric_values(df, metric or "val_loss", at_step)
    df = fill_option_defaults(df)
    groups = group_runs(df, by_keys)
    base = _pick_baseline(df, groups, baseline)
    done = df["status"].eq(COMPLETED).to_numpy()
    diff_cols = _differing(df, groups, by_keys, show_keys)
    extrap = sorted((c for c in df.columns if length_multiple(c) is not None), key=length_multiple)
    evals = eval_columns(df)
    numeric = {c: _numbers(df, c) for c in MEANS + tuple(extrap) + tuple(evals)}
    samples = [_completed_sample(values, g.index, done) for g in groups]
    numeric_threads = _numbers(df, "threads")
    curves = {k: [mean_curve(df.loc[[i for i in g.index if done[i]], "run_dir"], k) for g in groups]
              for k in ("val_loss", "train_loss")}
    curve_key = "val_loss" if all(len(c) >= 3 for c in curves["val_loss"]) else "train_loss"
    rows = []
    for gi, g in enumerate(groups):
        row = dict(g.keys)
        row.update({col: cell(df.at[g.index[0], col]) for col in diff_cols})
        row.update(_metric_cells(label, samples[gi], samples[base], gi == base, len(g.index)))
        row.update(_run_cells(df, g.index, [i for i in g.index if done[i]], numeric, extrap, evals))
        row["notes"] = _row_notes(row["notes"], label, g.index, done, reasons, numeric_threads)
        row["curve"] = sparkline(curves[curve_key][gi].to_numpy())
        rows.append({**row, **_made_with(df, g.index[0])})
    table = pd.DataFrame(rows)
    if sort:
        col, descending = _resolve_sort(table, sort, label)
        table = table.sort_values(col, ascending=not descending, na_position="last", kind="stable")
        table = table.reset_index(drop=True)
    table.attrs.update(metric=label, baseline=groups[base].label, group_cols=list(groups[0].keys),
                       config_cols=diff_cols, extrap_cols=extrap, curve=curve_key, budget=at is not None,
                       eval_cols=evals, higher_is_better=higher_is_better(label))
    return table


def _numbers(df: pd.DataFrame, col: str) -> pd.Series:
    """A column as numbers (text where a number belongs: NaN); all NaN when no run has it."""
    return pd.to_numeric(df[col], errors="coerce") if col in df.columns else pd.Series(math.nan, df.index)


def _made_with(df: pd.DataFrame, first: int) -> dict:
    """How a group's runs were made (one config per group, so its first run speaks for all):
    ``defined`` by the file as it stands, the command-line ``overrides``, a ``tuning`` run."""
    return {"defined": bool(df.at[first, "defined"]) if "defined" in df.columns else True,
            "overrides": cell_text(df.at[first, "overrides"]) if "overrides" in df.columns else "",
            "tuning": bool(df.at[first, "tuning"]) if "tuning" in df.columns else False}


def _check_units(df: pd.DataFrame, metric: str) -> None:
    """A loss is nats per token: refuse to compare it across runs whose tokens differ."""
    tokenizers = sorted(df["data.tokenizer"].dropna().astype(str).unique()) if "data.tokenizer" in df.columns else []
    if "loss" in str(metric) and len(tokenizers) > 1:
        raise ConfigError(f"these runs use different tokenizers ({', '.join(tokenizers)}), so a unit of "
                          f"{metric} differs between them; compare --metric val_bpb (bits per byte of the same text)")


def _row_notes(notes: str, label: str, index: list, done: np.ndarray, reasons: Optional[pd.Series],
               threads: pd.Series) -> str:
    """A row's footnotes: seeds that miss a budget, runs trained with different CPU thread counts."""
    parts = [notes]
    if reasons is not None:
        parts.append(_budget_note(label, index, done, reasons))
    counts = sorted({int(t) for t in threads.iloc[index].dropna()})
    if len(counts) > 1:  # matmul reductions sum in another order: seeds are not like for like
        parts.append(f"threads: its runs trained with {' and '.join(map(str, counts))} CPU threads")
    return "; ".join(filter(None, parts))


def _completed_sample(values: pd.Series, index: list, done: np.ndarray) -> np.ndarray:
    """The group's finite metric values from completed runs: the only ones a mean may pool."""
    v = values.iloc[[i for i in index if done[i]]].to_numpy(dtype=float)
    return v[np.isfinite(v)]


def _metric_cells(label: str, vals: np.ndarray, base_vals: np.ndarray, is_base: bool, n_total: int) -> dict:
    """The metric's mean ± std and its difference to the baseline, with the 95% Welch interval."""
    delta, lo, hi = welch_ci(vals, base_vals) if not is_base else (math.nan,) * 3
    return {"n": len(vals), "n_total": n_total,
            f"{label}_mean": vals.mean() if len(vals) else math.nan,
            f"{label}_std": vals.std(ddof=1) if len(vals) > 1 else math.nan,
            "delta": delta, "delta_ci_low": lo, "delta_ci_high": hi,
            "significant": bool(lo > 0 or hi < 0), "baseline": is_base,
            "seeds_needed": seeds_needed(vals, base_vals, delta) if not is_base else math.nan}


#: normal quantiles of a two-sided 95% test and 80% power
Z_975, Z_80 = 1.959964, 0.841621


def seeds_needed(vals: np.ndarray, base_vals: np.ndarray, delta: float) -> float:
    """Seeds per arm that would resolve a difference the size of ``delta`` at 95% confidence with
    80% power, given the pooled seed-to-seed standard deviation s: n = 2 ((z_0.975 + z_0.8) s / delta)^2,
    rounded up (nan without two seeds per arm, a spread or a difference)."""
    n1, n2 = len(vals), len(base_vals)
    if n1 < 2 or n2 < 2 or not math.isfinite(delta) or delta == 0:
        return math.nan
    pooled = ((n1 - 1) * vals.var(ddof=1) + (n2 - 1) * base_vals.var(ddof=1)) / (n1 + n2 - 2)
    if pooled <= 0:
        return math.nan
    return float(math.ceil(2 * ((Z_975 + Z_80) * math.sqrt(pooled) / abs(delta)) ** 2))


def _run_cells(df: pd.DataFrame, index: list, ok: list, numeric: dict, extrap: list, evals: list = ()) -> dict:
    """Summary means over the completed runs ``ok`` (best_val_step: median; each eval metric too),
    status counts, and why an extrapolation is missing."""
    cells: dict[str, Any] = {}
    for col in MEANS + tuple(extrap) + tuple(evals):
        v = numeric[col].iloc[ok].dropna()
        cells[col] = (v.median() if col == "best_val_step" else v.mean()) if len(v) else math.nan
    statuses = df["status"].iloc[index].value_counts()
    cells.update({f"n_{s}": int(statuses.get(s, 0)) for s in STATUSES})
    cells["notes"] = "; ".join(f"{c}: {r}" for c in extrap if math.isnan(cells[c])
                               for r in [_reason(df, index, c)] if r)
    return cells


def _pick_baseline(df: pd.DataFrame, groups: list[Group], baseline: Optional[str]) -> int:
    defined = [bool(df["defined"].iloc[g.index].all()) if "defined" in df.columns else True for g in groups]

    def find(name: str) -> Optional[int]:
        exact = [i for i, g in enumerate(groups) if name in (g.label, g.label.split("/")[-1])]
        if exact:
            return exact[0]
        named = [i for i, g in enumerate(groups) if g.name == name]
        current = [i for i in named if defined[i]]
        if len(named) > 1 and len(current) == 1:  # the file's own config wins over smoke runs and old versions
            return current[0]
        if len(named) > 1:
            raise ConfigError(f"baseline '{name}' is ambiguous: rows {', '.join(groups[i].label for i in named)} "
                              f"share it (their configs differ); pass one of those labels")
        return named[0] if named else None

    if baseline is not None:
        found = find(str(baseline))
        if found is None:
            labels = [g.label for g in groups]
            raise ConfigError(f"unknown baseline '{baseline}'{did_you_mean(str(baseline), labels)}; "
                              f"rows: {', '.join(labels)}")
        return found
    for block in experiment_blocks(df):
        if block.get("baseline") is not None:
            try:
                found = find(str(block["baseline"]))
            except ConfigError:
                found = None
            if found is not None:
                return found
    return next((i for i, d in enumerate(defined) if d), 0)


@lru_cache(maxsize=1)
def builtin_option_defaults() -> dict:
    """(kind, component name) -> {option: default} of every built-in, from the built-ins' manifest
    (read, never imported: tables load no torch)."""
    from .. import builtin_plugins
    from ..plugin.manager import read_manifest

    out: dict = {}
    for module in read_manifest(Path(builtin_plugins.__file__).parent).values():
        for reg in (module.get("registers") or []) if isinstance(module, dict) else []:
            if isinstance(reg, list) and len(reg) == 4 and isinstance(reg[3], list):
                out[(reg[0], reg[1])] = {o["name"]: o.get("default") for o in reg[3]
                                         if isinstance(o, dict) and not o.get("required") and "name" in o}
    return out


def fill_option_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Option columns (``model.position.base``) where a run left the option at its default hold
    that default (a built-in's, from the manifest), not a blank: a table then shows rope's base
    10000 beside another variant's 500."""
    defaults = builtin_option_defaults()
    out = df
    for col in config_columns(df):
        component, _, option = col.rpartition(".")
        if component not in df.columns or component.count(".") != 1:
            continue
        kind = component.split(".")[1]
        missing = df[col].isna() & df[component].notna()
        if not missing.any():
            continue
        values = [defaults.get((kind, str(name)), {}).get(option) if miss else value
                  for name, value, miss in zip(df[component], df[col], missing)]
        if out is df:
            out = df.copy()
        out[col] = pd.Series(values, index=df.index, dtype=object)
    return out


def _tuning_record(df: pd.DataFrame) -> list[dict]:
    """What experiment.json says of the experiment's ``tune:`` block (key, values, the lines that
    say what each variant chose), when it has one."""
    dirs = dict.fromkeys(str(Path(d).parent) for d in df["run_dir"])
    return [t for t in (read_experiment(Path(d)).get("tuning") for d in dirs) if isinstance(t, dict)]


def experiment_blocks(df: pd.DataFrame) -> list[dict]:
    """The ``compare`` block of each experiment the runs came from, in order of appearance."""
    dirs = dict.fromkeys(str(Path(d).parent) for d in df["run_dir"])
    return [read_experiment(Path(d)).get("compare") or {} for d in dirs]


def _differing(df: pd.DataFrame, groups: list[Group], by_keys: list[str], show_keys: Iterable[str] = ()) -> list[str]:
    """Config keys whose value differs between runs but is constant inside every group; the keys of
    ``show_keys`` (a tuned key) whenever they are constant inside every group, differing or not."""
    out = []
    shown = set(show_keys)
    for col in config_columns(df):
        if col in by_keys:
            continue
        text = df[col].map(cell_text)
        if (text.nunique() > 1 or col in shown) and all(text.iloc[g.index].nunique() == 1 for g in groups):
            out.append(col)
    return out


def _reason(df: pd.DataFrame, index: list, col: str) -> str:
    notes = f"notes.{col}"
    if notes not in df.columns:
        return ""
    found = df[notes].iloc[index].dropna()
    return str(found.iloc[0]) if len(found) else ""


def _resolve_sort(table: pd.DataFrame, sort: str, label: str) -> tuple[str, bool]:
    name = str(sort).strip()
    descending = name.startswith("-")
    name = name.lstrip("-")
    for cand in (name, f"{name}_mean", ALIASES.get(name, ""), f"{label}_mean" if name in (label, "metric") else ""):
        if cand in table.columns:
            return cand, descending
    raise ConfigError(f"--sort: unknown column '{name}'{did_you_mean(name, table.columns)}; "
                      f"columns: {', '.join(table.columns)} (prefix - for descending)")


def cell(v: Any) -> Any:
    """A DataFrame cell with NaN as None, so a missing config value groups and compares like null."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def cell_text(v: Any) -> str:
    """A cell as a label: ``-`` for a missing value."""
    v = cell(v)
    return "-" if v is None else str(v)


# -- loading and export ------------------------------------------------------------------------
def compare_results(*paths: Any, results_dir: Any = "results", by: Any = None, baseline: Optional[str] = None,
                    metric: Optional[str] = None, at_step: Optional[int] = None, sort: Optional[str] = None,
                    merge: bool = False, all_runs: bool = False, at: Optional[tuple[str, float]] = None,
                    defined_by: Optional[Callable[[Path], Optional[set]]] = None) -> list[pd.DataFrame]:
    """The comparison tables of the runs under ``paths``: one per experiment, or one for all with ``merge``.

    Each experiment is measured against its own baseline. By default only the runs each
    experiment's file defines as it stands now are shown (``all_runs``: every run, with the
    overrides it was made with); a run directory named in ``paths`` is always shown. by, metric,
    sort and baseline fall back to the experiment's ``compare`` block; ``defined_by`` as in
    load_results. ``table.attrs`` also holds
    ``experiment`` (its name, or None for a merged table) and ``hidden`` (runs left out).
    """
    df = load_results(*paths, results_dir=results_dir, **({"defined_by": defined_by} if defined_by else {}))
    parts = [df] if merge else [part for _, part in df.groupby(df["run_dir"].map(lambda d: str(Path(d).parent)),
                                                               sort=False)]
    tables = []
    for part in parts:
        hidden = part[~part["defined"].astype(bool)] if not all_runs else part.iloc[:0]
        if len(hidden) == len(part):  # nothing as the file defines it now: show them all, marked, not nothing
            hidden = part.iloc[:0]
        shown = part.drop(hidden.index).reset_index(drop=True)
        name = None if merge else str(part["experiment"].iloc[0])
        if shown.empty:
            table = pd.DataFrame()
            table.attrs.update(experiment=name, hidden=len(hidden), metric=None)
            tables.append(table)
            continue
        blocks = experiment_blocks(shown)
        tuning = [] if merge else _tuning_record(shown)

        def default(key: str) -> Any:
            return next((b[key] for b in blocks if b.get(key) is not None), None)

        scale = None if merge else scale_record(shown)
        chosen_metric = metric or default("metric") or "val_loss"
        for size, rows, base in ladder_parts(shown, scale, baseline):
            table = compare_table(rows, by=by if by is not None else default("by"), baseline=base,
                                  metric=chosen_metric, at_step=at_step, sort=sort or default("sort"), at=at,
                                  show_keys=[t["key"] for t in tuning if isinstance(t.get("key"), str)])
            table.attrs.update(experiment=name if size is None else f"{name}, size {size}", hidden=len(hidden),
                               hidden_tuning=int(hidden["tuning"].astype(bool).sum()) if "tuning" in hidden else 0,
                               tuning=[str(line) for t in tuning for line in t.get("lines") or []
                                       if isinstance(line, str)])
            tables.append(table)
        if scale is not None:
            tables[-1].attrs["scaling"] = ladder_lines(shown, scale, chosen_metric, baseline)
    return tables


def export(table: Any, fmt: str) -> str:
    """A table (or several per-experiment tables, stacked with an ``experiment`` column first) as csv
    or json text that pandas reads back to the same numbers (json keeps 15 digits)."""
    if isinstance(table, list) and len(table) == 1:
        table = table[0]
    if isinstance(table, list):
        frames = [t if "experiment" in t.columns else t.assign(experiment=t.attrs.get("experiment"))
                  for t in table if len(t)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if "experiment" in table.columns:
            table = table[["experiment", *[c for c in table.columns if c != "experiment"]]]
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", double_precision=15) + "\n"
    raise ConfigError(f"unknown export format '{fmt}'{did_you_mean(fmt, EXPORTS)}; formats: {', '.join(EXPORTS)}")
