"""Aggregate runs into one row per variant and print it as a rich table, CSV, Markdown or JSON.

Statistics. A group's metric is the mean ± sample std over its *completed* runs; diverged, failed,
interrupted and running runs are counted in their own columns and never enter a mean (a NaN loss
or a half-trained model is not a sample of the same thing). The difference to the baseline gets a
95% confidence interval from Welch's t (Welch–Satterthwaite degrees of freedom), because seeds are
few and two architectures need not share a variance; ``*`` marks intervals that exclude zero.
With fewer than 3 seeds per arm the table says so: with 2 seeds each, "both beat both" happens by
chance 1 time in 6.

Layout follows DVC's ``exp show``: only the config keys that differ between runs become columns,
column order is fixed, and when the terminal is narrow the lowest-priority columns are dropped
(and named) rather than squeezed into ellipses. Every format is rendered from the same
``compare_table`` DataFrame, so CSV and JSON carry the numbers and the table only formats them.
"""
from __future__ import annotations

import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from .errors import ConfigError, did_you_mean
from .results import META, SECTIONS, load_results, read_experiment, read_metrics
from .termplot import sparkline

FORMATS = ("table", "csv", "md", "json")
ALIASES = {"val_loss": "final_val_loss", "train_loss": "final_train_loss"}
LOGGED_AS = {"final_val_loss": "val_loss", "final_train_loss": "train_loss"}  # names in metrics.jsonl
STATUSES = ("completed", "diverged", "failed", "interrupted", "running")
MEANS = ("best_val_loss", "best_val_step", "final_train_loss", "tokens_per_s", "mfu", "parameters",
         "peak_memory", "memory_estimate", "wall_time_s")
EXTRAP = re.compile(r"^val_loss@([0-9.eE+-]+)x$")
SMALL_N = 3


@dataclass
class Group:
    """Runs that form one table row: ``label`` is what --baseline matches and the table shows."""

    label: str
    keys: dict
    index: list = field(default_factory=list)
    variant: Optional[str] = None


# -- statistics --------------------------------------------------------------------------------
def welch_ci(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch t interval; NaN bounds when a side has fewer than 2 values."""
    from scipy import stats

    a, b = np.asarray(list(a), float), np.asarray(list(b), float)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return delta, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:  # identical seeds on both sides: the difference is exact
        return delta, delta, delta
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb))
    return delta, delta - half, delta + half


# -- grouping and metric lookup ----------------------------------------------------------------
def config_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.split(".")[0] in SECTIONS and "." in c]


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

    The default group is "everything except the seed": one variant at one config hash, so runs of
    an edited YAML or a CLI override never get averaged with the old ones (the label then carries
    the hash), and variants of merged experiments stay apart (the label carries the experiment).
    """
    groups: dict[tuple, Group] = {}
    if by_keys:
        for pos, key in enumerate(zip(*(df[k].map(_cell) for k in by_keys))):
            label = ",".join(_text(v) for v in key)
            groups.setdefault(key, Group(label, dict(zip(by_keys, key)))).index.append(pos)
        return list(groups.values())
    merged = df["experiment"].nunique(dropna=False) > 1
    hashes = df.groupby(["experiment", "variant"], dropna=False)["config_hash"].nunique(dropna=False)
    for pos, (exp, variant, chash) in enumerate(zip(df["experiment"], df["variant"], df["config_hash"])):
        name = str(variant)
        if hashes.get((exp, variant), 1) > 1:
            name += f"#{str(chash)[:6]}"
        label = f"{exp}/{name}" if merged else name
        keys = {"experiment": exp, "variant": name} if merged else {"variant": name}
        groups.setdefault((exp, variant, chash), Group(label, keys, variant=str(variant))).index.append(pos)
    return list(groups.values())


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
            frames.append(m[["step", key]].dropna())
    if not frames:
        return pd.Series(dtype=float)
    return pd.concat(frames).groupby("step")[key].mean()


# -- the table ---------------------------------------------------------------------------------
def compare_table(df: pd.DataFrame, by: Any = None, baseline: Optional[str] = None, metric: str = "val_loss",
                  at_step: Optional[int] = None, sort: Optional[str] = None) -> pd.DataFrame:
    """One row per group (default: per variant, seeds aggregated), the source of every format.

    Columns, in this order: the group keys; config keys that differ between runs (when constant
    within each group); n (values in the mean) and n_total; ``<metric>_mean`` and ``_std``; delta
    to the baseline with ``delta_ci_low/high`` (95% Welch) and ``significant``; ``baseline``;
    best_val_loss and best_val_step (median); final_train_loss; tokens_per_s, mfu, parameters,
    peak_memory and wall_time_s means; ``val_loss@Nx`` means; ``n_<status>`` counts; ``notes`` (why an
    extrapolation is missing); ``curve`` (sparkline of the mean val loss, or train loss when val
    was evaluated fewer than 3 times). ``table.attrs`` records the choices for the renderers.
    Default baseline: the experiment's ``compare.baseline``, else the first group.
    """
    if df is None or len(df) == 0:
        raise ConfigError("no runs to compare")
    df = df.reset_index(drop=True)
    by_keys = resolve_by(df, by)
    values, label = metric_values(df, metric or "val_loss", at_step)
    groups = group_runs(df, by_keys)
    base = _pick_baseline(df, groups, baseline)
    done = df["status"].eq("completed").to_numpy()
    diff_cols = _differing(df, groups, by_keys)
    extrap = sorted((c for c in df.columns if EXTRAP.match(c)), key=lambda c: float(EXTRAP.match(c)[1]))
    numeric = {c: pd.to_numeric(df[c], errors="coerce") if c in df.columns else pd.Series(math.nan, df.index)
               for c in MEANS + tuple(extrap)}

    def sample(g: Group) -> np.ndarray:
        v = values.iloc[[i for i in g.index if done[i]]].to_numpy(dtype=float)
        return v[np.isfinite(v)]

    base_vals = sample(groups[base])
    curves = {k: [mean_curve(df.loc[[i for i in g.index if done[i]], "run_dir"], k) for g in groups]
              for k in ("val_loss", "train_loss")}
    curve_key = "val_loss" if all(len(c) >= 3 for c in curves["val_loss"]) else "train_loss"
    rows = []
    for gi, g in enumerate(groups):
        ok = [i for i in g.index if done[i]]
        vals = sample(g)
        row = dict(g.keys)
        for col in diff_cols:
            row[col] = _cell(df.at[g.index[0], col])
        row.update({"n": len(vals), "n_total": len(g.index),
                    f"{label}_mean": vals.mean() if len(vals) else math.nan,
                    f"{label}_std": vals.std(ddof=1) if len(vals) > 1 else math.nan})
        delta, lo, hi = welch_ci(vals, base_vals) if gi != base else (math.nan,) * 3
        row.update({"delta": delta, "delta_ci_low": lo, "delta_ci_high": hi,
                    "significant": bool(lo > 0 or hi < 0), "baseline": gi == base})
        for col in MEANS + tuple(extrap):
            v = numeric[col].iloc[ok].dropna()
            row[col] = (v.median() if col == "best_val_step" else v.mean()) if len(v) else math.nan
        statuses = df["status"].iloc[g.index].value_counts()
        row.update({f"n_{s}": int(statuses.get(s, 0)) for s in STATUSES})
        row["notes"] = "; ".join(f"{c}: {r}" for c in extrap if math.isnan(row[c])
                                 for r in [_reason(df, g.index, c)] if r)
        row["curve"] = sparkline(curves[curve_key][gi].to_numpy())
        rows.append(row)
    table = pd.DataFrame(rows)
    if sort:
        col, descending = _resolve_sort(table, sort, label)
        table = table.sort_values(col, ascending=not descending, na_position="last", kind="stable")
        table = table.reset_index(drop=True)
    table.attrs.update(metric=label, baseline=groups[base].label, group_cols=list(groups[0].keys),
                       config_cols=diff_cols, extrap_cols=extrap, curve=curve_key)
    return table


def _pick_baseline(df: pd.DataFrame, groups: list[Group], baseline: Optional[str]) -> int:
    def find(name: str) -> Optional[int]:
        for i, g in enumerate(groups):
            if g.label == name:
                return i
        return next((i for i, g in enumerate(groups) if name in (g.variant, g.label.split("/")[-1])), None)

    if baseline is not None:
        found = find(str(baseline))
        same_variant = [g.label for g in groups if g.label != str(baseline) and str(baseline) == g.variant]
        if found is not None and groups[found].label != str(baseline) and len(same_variant) > 1:
            raise ConfigError(f"baseline '{baseline}' is ambiguous: rows {', '.join(same_variant)} share that variant "
                              f"name (runs of an older config); pass one of those labels")
        if found is None:
            labels = [g.label for g in groups]
            raise ConfigError(f"unknown baseline '{baseline}'{did_you_mean(str(baseline), labels)}; "
                              f"rows: {', '.join(labels)}")
        return found
    for block in experiment_blocks(df):
        if block.get("baseline") is not None and find(str(block["baseline"])) is not None:
            return find(str(block["baseline"]))
    return 0


def experiment_blocks(df: pd.DataFrame) -> list[dict]:
    """The ``compare`` block of each experiment the runs came from, in order of appearance."""
    dirs = dict.fromkeys(str(Path(d).parent) for d in df["run_dir"])
    return [read_experiment(Path(d)).get("compare") or {} for d in dirs]


def _differing(df: pd.DataFrame, groups: list[Group], by_keys: list[str]) -> list[str]:
    """Config keys whose value differs between runs but is constant inside every group."""
    out = []
    for col in config_columns(df):
        if col in by_keys:
            continue
        text = df[col].map(_text)
        if text.nunique() > 1 and all(text.iloc[g.index].nunique() == 1 for g in groups):
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


def _cell(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _text(v: Any) -> str:
    v = _cell(v)
    return "-" if v is None else str(v)


# -- rendering ---------------------------------------------------------------------------------
@dataclass
class Column:
    header: str
    cells: list
    priority: int  # 0-2 are never dropped; higher numbers go first when the terminal is narrow
    justify: str = "right"
    styles: Optional[list] = None
    wrap_at: Optional[int] = None  # set on a name column when even the essential columns overflow


def display_columns(table: pd.DataFrame) -> list[Column]:
    """The human-readable columns in display order, each with its drop priority."""
    a = table.attrs
    label = a["metric"]
    cols = [Column(k, [_text(v) for v in table[k]], 0, "left") for k in a["group_cols"]]
    short = _short_names(a["config_cols"])
    cols += [Column(short[k], [_text(v) for v in table[k]], 6, "left") for k in a["config_cols"]]
    cols.append(Column("n", [f"{n}/{t}" for n, t in zip(table["n"], table["n_total"])], 1))
    trouble = table[[f"n_{s}" for s in STATUSES[1:]]].to_numpy().sum() > 0
    status = [_status_text(r) for _, r in table.iterrows()]
    cols.append(Column("status", status, 2 if trouble else 14, "left",
                       ["red" if "diverged" in s or "failed" in s else "yellow" if s != "ok" else "" for s in status]))
    marks = _footnote_marks(table)
    cols.append(Column(label, [_pm(m, s) + (marks.get((i, label), "") if math.isnan(m) else "")
                               for i, (m, s) in enumerate(zip(table[f"{label}_mean"], table[f"{label}_std"]))], 1))
    if len(table) > 1:
        deltas = [_delta_text(r) for _, r in table.iterrows()]
        base = a["baseline"]
        cols.append(Column(f"Δ vs {base}" if len(base) <= 12 else "Δ", deltas, 1,
                           styles=["bold" if r["significant"] else "" for _, r in table.iterrows()]))
    cols.append(Column(f"{'val' if a['curve'] == 'val_loss' else 'train'} curve", list(table["curve"]), 5, "left"))
    for col in a["extrap_cols"]:
        cells = [_num(v, "{:.4f}") if not math.isnan(v) else "n/a" + marks.get((i, col), "")
                 for i, v in enumerate(table[col])]
        mult = EXTRAP.match(col)[1]
        cols.append(Column(f"@{mult}x", cells, 9 if float(mult) == 1 else 7))  # @1x repeats the val loss
    cols.append(Column("best val", [_num(v, "{:.4f}") + (f" @{s:.0f}" if not math.isnan(s) else "")
                                     for v, s in zip(table["best_val_loss"], table["best_val_step"])], 8))
    cols.append(Column("train", [_num(v, "{:.4f}") for v in table["final_train_loss"]], 9))
    cols.append(Column("tok/s", [_num(v, "{:,.0f}") for v in table["tokens_per_s"]], 10))
    cols.append(Column("MFU", [_num(v * 100 if v == v else v, "{:.1f}%") for v in table["mfu"]], 13))
    cols.append(Column("params", [_si(v) for v in table["parameters"]], 11))
    # measured CUDA peak; elsewhere the analytic estimate, marked with ~
    estimate = table["memory_estimate"] if "memory_estimate" in table else [math.nan] * len(table)
    cols.append(Column("peak mem", [_bytes(v) if v == v else ("~" + _bytes(e) if e == e else "n/a")
                                    for v, e in zip(table["peak_memory"], estimate)], 15))
    cols.append(Column("wall", [_duration(v) for v in table["wall_time_s"]], 12))
    for c in cols:  # a column with nothing measured (MFU on CPU) is the first to go when narrow
        if c.priority > 2 and all(str(x).startswith("n/a") for x in c.cells):
            c.priority = 20
    return cols


def table_notes(table: pd.DataFrame) -> list[str]:
    """Lines printed under the table: how to read it, small-n warning, why cells are n/a."""
    a = table.attrs
    notes = []
    if len(table) > 1:
        notes.append(f"{a['metric']}: mean ± std over completed runs; Δ: difference to {a['baseline']} "
                     f"± half-width of its 95% CI (Welch's t); * = the CI excludes 0")
    small = [_row_label(table, i) for i in range(len(table)) if table["n"].iloc[i] < SMALL_N]
    if small:
        notes.append(f"note: n < {SMALL_N} for {', '.join(small)}: with 2 seeds per arm one variant beats the "
                     f"other on both seeds by chance 1 time in 6; treat these differences as anecdotes and "
                     f"add seeds (e.g. seeds: [0, 1, 2, 3, 4])")
    if table[[f"n_{s}" for s in STATUSES[1:]]].to_numpy().sum():
        notes.append("diverged, failed, interrupted and running runs are counted in status and left out of "
                     "every mean")
    if a["extrap_cols"]:
        notes.append("@Nx: validation loss at N times the training length")
    reasons = _footnote_reasons(table)
    for reason, mark in reasons.items():
        notes.append(f"{mark} {reason}")
    return notes


def _footnote_reasons(table: pd.DataFrame) -> dict[str, str]:
    """Distinct n/a reasons ('val_loss@2x: why', with the rows), numbered ¹ ² ³ in order."""
    reasons: dict[str, list] = {}
    for i, notes in enumerate(table["notes"]):
        for part in filter(None, str(notes or "").split("; ")):
            reasons.setdefault(part, []).append(_row_label(table, i))
    sup = "¹²³⁴⁵⁶⁷⁸⁹"
    return {f"{r} ({', '.join(rows)})": sup[min(k, len(sup) - 1)] for k, (r, rows) in enumerate(reasons.items())}


def _footnote_marks(table: pd.DataFrame) -> dict[tuple, str]:
    marks, order = {}, {}
    for i, notes in enumerate(table["notes"]):
        for part in filter(None, str(notes or "").split("; ")):
            order.setdefault(part, "¹²³⁴⁵⁶⁷⁸⁹"[min(len(order), 8)])
            marks[(i, part.split(": ", 1)[0])] = order[part]
    return marks


def render(table: pd.DataFrame, fmt: str = "table", console: Any = None, width: Optional[int] = None) -> str:
    """Text for csv, md and json; for 'table', print to ``console`` (rich) and return ''."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}'{did_you_mean(fmt, FORMATS)}; formats: {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", double_precision=15) + "\n"
    if fmt == "md":
        cols = display_columns(table)
        esc = lambda s: str(s).replace("|", "\\|")
        lines = ["| " + " | ".join(esc(c.header) for c in cols) + " |",
                 "|" + "|".join("---:" if c.justify == "right" else "---" for c in cols) + "|"]
        lines += ["| " + " | ".join(esc(c.cells[i]) for c in cols) + " |" for i in range(len(table))]
        return "\n".join(lines + [""] + table_notes(table)) + "\n"
    _print_rich(table, console, width)
    return ""


def _print_rich(table: pd.DataFrame, console: Any, width: Optional[int]) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console(highlight=False, width=width)
    width = width or console.width
    cols = display_columns(table)
    kept = list(cols)
    while _natural_width(kept, len(table)) > width:
        droppable = [c for c in kept if c.priority > 2]
        if not droppable:
            break
        kept.remove(max(droppable, key=lambda c: (c.priority, cols.index(c))))
    for col in sorted((c for c in cols if c not in kept), key=lambda c: c.priority):  # refill narrow ones
        trial = [c for c in cols if c in kept or c is col]
        if _natural_width(trial, len(table)) <= width:
            kept = trial
    excess = _natural_width(kept, len(table)) - width
    labels = [c for c in kept if c.priority == 0]
    if excess > 0 and labels:  # only names and essential numbers left: wrap the longest name
        longest = max(labels, key=lambda c: max(len(str(x)) for x in [c.header, *c.cells]))
        longest.wrap_at = max(8, max(len(str(x)) for x in [longest.header, *longest.cells]) - excess)
    console.print(_rich_table(kept, len(table)))
    notes = table_notes(table)
    hidden = [c.header for c in cols if c not in kept]
    if hidden:
        notes.append(f"hidden at width {width}: {', '.join(hidden)} (see them with --format md)")
    for line in notes:
        console.print(Text(line, style="yellow" if line.startswith("note:") else "dim"))


def _rich_table(cols: list[Column], nrows: int):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for c in cols:
        t.add_column(c.header, justify=c.justify, no_wrap=not c.wrap_at, overflow="fold" if c.wrap_at else "ellipsis",
                     min_width=c.wrap_at, max_width=c.wrap_at)
    for i in range(nrows):
        t.add_row(*[Text(str(c.cells[i]), style=(c.styles[i] if c.styles else "")) for c in cols])
    return t


def _natural_width(cols: list[Column], nrows: int) -> int:
    from rich.console import Console

    wide = Console(width=100_000, file=io.StringIO())
    return wide.measure(_rich_table(cols, nrows)).maximum


def _short_names(keys: list[str]) -> dict[str, str]:
    """Key without its section as the header (a component option keeps its component: position.base),
    or the full key when two headers would clash."""
    last = [".".join(k.split(".")[1:]) or k for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _row_label(table: pd.DataFrame, i: int) -> str:
    return ",".join(_text(table[k].iloc[i]) for k in table.attrs["group_cols"])


def _status_text(row: pd.Series) -> str:
    parts = [f"{int(row[f'n_{s}'])} {s}" for s in STATUSES[1:] if row[f"n_{s}"]]
    return ", ".join(parts) or "ok"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if not math.isnan(std) else "")


def _delta_text(row: pd.Series) -> str:
    if row["baseline"]:
        return "baseline"
    d, lo, hi = row["delta"], row["delta_ci_low"], row["delta_ci_high"]
    if math.isnan(d):
        return "n/a"
    if math.isnan(lo):
        return f"{d:+.4f} (n<2)"
    return f"{d:+.4f} ± {(hi - lo) / 2:.4f}" + (" *" if row["significant"] else "")


def _num(v: Any, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _si(v: float) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}"


def _bytes(v: float) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(v) >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B"


def _duration(v: float) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if v < 60:
        return f"{v:.1f}s"
    if v < 3600:
        return f"{int(v // 60)}m{int(v % 60):02d}s"
    return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"


# -- entry point -------------------------------------------------------------------------------
def print_compare(paths: Iterable[Any] = (), *, by: Any = None, baseline: Optional[str] = None,
                  metric: Optional[str] = None, at_step: Optional[int] = None, sort: Optional[str] = None,
                  format: str = "table", results_dir: Any = "results", file: Any = None,
                  width: Optional[int] = None) -> pd.DataFrame:
    """Load runs, aggregate them and print one format; returns the aggregated table.

    Options left unset fall back to the experiment's ``compare`` block (by, metric, sort; baseline
    inside compare_table), so ``gptlab compare results/x`` shows what the YAML asked for. CSV and
    JSON go to stdout alone (notes to stderr) so the output can be piped into pandas.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown --format '{format}'{did_you_mean(format, FORMATS)}; "
                          f"formats: {', '.join(FORMATS)}")
    df = load_results(*paths, results_dir=results_dir)
    blocks = experiment_blocks(df)

    def default(key: str) -> Any:
        return next((b[key] for b in blocks if b.get(key) is not None), None)

    table = compare_table(df, by=by if by is not None else default("by"), baseline=baseline,
                          metric=metric or default("metric") or "val_loss", at_step=at_step,
                          sort=sort or default("sort"))
    out = file or sys.stdout
    if format == "table":
        from rich.console import Console

        render(table, "table", Console(file=out, highlight=False, width=width), width)
    else:
        out.write(render(table, format))
        if format in ("csv", "json"):
            sys.stderr.write("".join(line + "\n" for line in table_notes(table)))
    return table
