"""The comparison table for people: a rich table in the terminal or Markdown, with notes under it.

Both are drawn from ``compare.compare_table``'s DataFrame, so they only format numbers that csv
and json carry too. Layout follows DVC's ``exp show``: column order is fixed, and when the
terminal is narrow the lowest-priority columns are dropped and named under the table rather than
squeezed into ellipses.
"""
from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import pandas as pd

from .. import fmt
from ..results.compare import (EXPORTS, HIGHER_IS_BETTER, SMALL_N, cell_text, compare_results,  # noqa: F401
                               export, higher_is_better)
from ..errors import ConfigError, did_you_mean
from ..rundir import COMPLETED, DIVERGED, FAILED, STATUSES, length_multiple

FORMATS = ("table", "csv", "md", "json")
TROUBLE = tuple(s for s in STATUSES if s != COMPLETED)  # statuses whose runs stay out of the means
MARKS = "¹²³⁴⁵⁶⁷⁸⁹"
#: the drop priority of a column that is n/a in every row: the first to go when the terminal is narrow
NOTHING_MEASURED = 20


@dataclass
class Column:
    header: str
    cells: list
    priority: int  # 0-2 are never dropped; higher numbers go first when the terminal is narrow
    justify: str = "right"
    styles: Optional[list] = None
    wrap_at: Optional[int] = None  # set on a config column when even the essential columns overflow
    #: "label": a row label, never dropped, cut or wrapped; "config": a config key, wrapped and then
    #: dropped (right to left) only when the labels and the essential numbers do not fit otherwise
    role: Optional[str] = None


def display_columns(table: pd.DataFrame) -> list[Column]:
    """The human-readable columns in display order, each with its drop priority."""
    a = table.attrs
    label = a["metric"]
    cols = [Column(k, [cell_text(v) for v in table[k]], 0, "left", role="label") for k in a["group_cols"]]
    short = _short_names(a["config_cols"])
    cols += [Column(short[k], [cell_text(v) for v in table[k]], 0, "left", role="config") for k in a["config_cols"]]
    if "defined" in table.columns and not table["defined"].all():
        tuning = table["tuning"] if "tuning" in table.columns else [False] * len(table)
        made = [("" if d else "tune: block" if t else (o if o and o != "-" else "earlier version of the file"))
                for d, t, o in zip(table["defined"], tuning, table["overrides"])]
        cols.append(Column("made with", made, 0, "left"))
    cols.append(Column("n", [f"{n}/{t}" for n, t in zip(table["n"], table["n_total"])], 1))
    trouble = table[[f"n_{s}" for s in TROUBLE]].to_numpy().sum() > 0
    status = [_status_text(r) for _, r in table.iterrows()]
    cols.append(Column("status", status, 2 if trouble else 14, "left",
                       ["red" if DIVERGED in s or FAILED in s else "yellow" if s != "ok" else "" for s in status]))
    marks = _footnote_marks(table)
    cols.append(Column(label, [_pm(m, s) + (marks.get((i, label), "") if math.isnan(m) else "")
                               for i, (m, s) in enumerate(zip(table[f"{label}_mean"], table[f"{label}_std"]))], 1))
    if len(table) > 1:
        deltas = [_delta_text(r) for _, r in table.iterrows()]
        base = a["baseline"]
        cols.append(Column(f"Δ vs {base}" if len(base) <= 12 else "Δ", deltas, 1,
                           styles=["bold" if r["significant"] else "" for _, r in table.iterrows()]))
        if a.get("show_seeds_needed"):  # compare --seeds-needed
            cols.append(Column("seeds needed", ["baseline" if r["baseline"] else fmt.num(r["seeds_needed"], "{:.0f}")
                                                for _, r in table.iterrows()], 1))
    cols.append(Column(f"{'val' if a['curve'] == 'val_loss' else 'train'} curve", list(table["curve"]), 5, "left"))
    for col in a["extrap_cols"]:
        cells = [fmt.num(v, "{:.4f}") if not math.isnan(v) else fmt.NA + marks.get((i, col), "")
                 for i, v in enumerate(table[col])]
        header = "@" + col.partition("@")[2]  # val_loss@2x -> @2x
        cols.append(Column(header, cells, 9 if length_multiple(col) == 1 else 3))  # @1x repeats the val loss
    for col in a.get("eval_cols", ()):  # downstream evals (hellaswag_acc): means over completed seeds
        if col != label:  # the chosen metric has its column already
            cols.append(Column(col, [fmt.num(v, "{:.4f}") for v in table[col]], 7 if col.endswith("_stderr") else 4))
    cols.append(Column("best val", [fmt.num(v, "{:.4f}") + (f" @{s:.0f}" if not math.isnan(s) else "")
                                     for v, s in zip(table["best_val_loss"], table["best_val_step"])], 8))
    cols.append(Column("train", [fmt.num(v, "{:.4f}") for v in table["final_train_loss"]], 9))
    cols.append(Column("tok/s", [fmt.num(v, "{:,.0f}") for v in table["tokens_per_s"]], 10))
    cols.append(Column("MFU", [fmt.num(v * 100, "{:.1f}%") for v in table["mfu"]], 13))
    cols.append(Column("params", [fmt.si(v) + (f" ({fmt.si(a)} active)" if isinstance(a, float) and not math.isnan(a)
                                                else "")  # experts a token skips (MoE)
                                  for v, a in zip(table["parameters"], table["active_parameters"])], 11))
    cols.append(Column("peak mem", [_memory(v, e) for v, e in zip(table["peak_memory"], _estimates(table))], 15))
    cols.append(Column("wall", [fmt.duration(v) for v in table["wall_time_s"]], 12))
    for c in cols:  # a column with nothing measured (MFU on CPU) is the first to go when narrow
        if c.priority > 2 and all(str(x).startswith(fmt.NA) for x in c.cells):
            c.priority = NOTHING_MEASURED
    return cols


def table_notes(table: pd.DataFrame) -> list[str]:
    """Lines printed under the table: how to read it, small-n warning, why cells are n/a."""
    a = table.attrs
    notes = []
    if len(table) > 1:
        notes.append(f"{a['metric']}: mean ± std over completed runs; Δ: difference to {a['baseline']} "
                     f"± half-width of its 95% CI (Welch's t); * = the CI excludes 0")
    for n, why in ((0, "no completed run reaches this budget: nothing to average" if a.get("budget") else
                       "no completed run: nothing to average"),
                   (1, "one run per row has no spread, so no interval can be given"),
                   (2, "with 2 seeds per arm one variant beats the other on both seeds by chance 1 time in 6")):
        rows = [_row_label(table, i) for i in range(len(table)) if table["n"].iloc[i] == n]
        if rows and n < SMALL_N:
            notes.append(f"note: n = {n} for {', '.join(rows)}: {why}"
                         + ("" if n == 0 else "; treat differences as anecdotes and add seeds (e.g. seeds: [0, 1, 2, 3, 4])"))
    if table[[f"n_{s}" for s in TROUBLE]].to_numpy().sum():
        notes.append("diverged, failed, interrupted and running runs are counted in status and left out of "
                     "every mean")
    if a["extrap_cols"]:
        notes.append("@Nx: validation loss at N times the training length")
    if "defined" in table.columns and not table["defined"].all():
        tuning = "tuning" in table.columns and table["tuning"].any()
        notes.append("made with: rows whose config the experiment's file does not define as it stands now "
                     "(command-line overrides, or an earlier version of the file)" if not tuning else
                     "made with: rows that are not the comparison the file defines (tune: block: the tuning "
                     "runs of each value; else command-line overrides or an earlier version of the file)")
    notes += verdicts(table)
    if a.get("scaling"):
        notes += list(a["scaling"])
    if a.get("tuning"):
        notes.append("tuned per variant (the lowest tuning metric wins; tuning runs: gptlab compare --all):")
        notes += [f"  {line}" for line in a["tuning"]]
    if a.get("hidden"):
        notes.append(hidden_note(a["hidden"], a.get("hidden_tuning", 0)))
    for reason, mark in _footnote_reasons(table).items():
        notes.append(f"{mark} {reason}")
    return notes


#: which metrics are better when larger: gptlab.results.compare.HIGHER_IS_BETTER (imported here, where it lived)


def verdicts(table: pd.DataFrame) -> list[str]:
    """One sentence per compared row: better, worse or not distinguishable from the baseline at 95%,
    with the seeds behind it (and, when not distinguishable, the seeds a difference this size needs)."""
    a = table.attrs
    metric, base = a["metric"], a["baseline"]
    higher = a.get("higher_is_better", higher_is_better(metric))
    base_n = next((int(n) for n, b in zip(table["n"], table["baseline"]) if b), 0)
    out = []
    for i in range(len(table)):
        row = table.iloc[i]
        if row["baseline"] or not math.isfinite(row["delta"]):
            continue
        label, n = _row_label(table, i), f"n = {int(row['n'])} vs {base_n}"
        need = row.get("seeds_needed")  # 95% confidence, 80% power, from the pooled seed spread
        need = (f"; {int(need)} seed{'s' if need > 1 else ''} per arm resolve{'' if need > 1 else 's'} a "
                f"difference this size" if isinstance(need, float) and math.isfinite(need) else "")
        if int(row["n"]) < 2 or base_n < 2:
            out.append(f"{label}: no interval with one seed in an arm ({n}); add seeds to compare it with {base}")
        elif row["significant"]:
            better = (row["delta"] > 0) == higher
            out.append(f"{label}: {'better' if better else 'worse'} than {base} at 95% "
                       f"({metric} {row['delta']:+.4f}, {n}{need})")
        else:
            out.append(f"{label}: not distinguishable from {base} at 95% ({n}{need})")
    return out


def _footnote_reasons(table: pd.DataFrame) -> dict[str, str]:
    """Distinct n/a reasons ('val_loss@2x: why', with the rows), numbered ¹ ² ³ in order."""
    reasons: dict[str, list] = {}
    for i, notes in enumerate(table["notes"]):
        for part in filter(None, str(notes or "").split("; ")):
            reasons.setdefault(part, []).append(_row_label(table, i))
    return {f"{r} ({', '.join(rows)})": MARKS[min(k, len(MARKS) - 1)] for k, (r, rows) in enumerate(reasons.items())}


def _footnote_marks(table: pd.DataFrame) -> dict[tuple, str]:
    """(row, column) -> the mark of the reason its cell is n/a, numbered as in _footnote_reasons."""
    marks, order = {}, {}
    for i, notes in enumerate(table["notes"]):
        for part in filter(None, str(notes or "").split("; ")):
            order.setdefault(part, MARKS[min(len(order), len(MARKS) - 1)])
            marks[(i, part.split(": ", 1)[0])] = order[part]
    return marks


# -- output ------------------------------------------------------------------------------------
def print_compare(paths: Iterable[Any] = (), *, by: Any = None, baseline: Optional[str] = None,
                  metric: Optional[str] = None, at_step: Optional[int] = None, sort: Optional[str] = None,
                  format: str = "table", results_dir: Any = "results", file: Any = None,
                  width: Optional[int] = None, merge: bool = False, all_runs: bool = False,
                  at: Optional[tuple[str, float]] = None, seeds_needed: bool = False) -> list[pd.DataFrame]:
    """Load runs, aggregate them and print one format; returns the tables (one per experiment unless merged).

    Options left unset come from each experiment's ``compare`` block (see compare_results). csv and
    json go to the output alone, their notes to stderr, so the output can be piped into pandas.
    """
    _check_format(format)
    from ..run.experiment import current_definition

    tables = compare_results(*paths, results_dir=results_dir, by=by, baseline=baseline, metric=metric,
                             at_step=at_step, sort=sort, merge=merge, all_runs=all_runs, at=at,
                             defined_by=current_definition)
    for table in tables:
        table.attrs["show_seeds_needed"] = seeds_needed
    out = file or sys.stdout
    if format in EXPORTS:
        out.write(export(tables, format))
        notes = [f"{t.attrs['experiment']}: {line}" if len(tables) > 1 else line
                 for t in tables for line in (table_notes(t) if len(t) else [_empty_note(t)])]
        sys.stderr.write("".join(line + "\n" for line in notes))
        return tables
    console = None
    if format == "table":
        from rich.console import Console

        console = Console(file=out, highlight=False, width=width)
    for i, table in enumerate(tables):
        title = table.attrs.get("experiment") if len(tables) > 1 else None
        if format == "md":
            out.write(("\n" if i else "") + (f"### {title}\n\n" if title else "")
                      + (render(table, "md") if len(table) else _empty_note(table) + "\n"))
            continue
        from rich.text import Text

        if title:
            console.print(Text(("\n" if i else "") + title, style="bold"))
        if len(table):
            render(table, "table", console, width)
        else:
            console.print(Text(_empty_note(table), style="yellow"))
    return tables


def hidden_note(n: int, tuning: int = 0) -> str:
    """Why runs are missing from a table: the tune: block's tuning runs, and runs of overrides or of
    an earlier version of the file."""
    parts = [f"{tuning} tuning run(s) of the tune: block not shown (--all shows them)"] if tuning else []
    if n - tuning:
        parts.append(f"{n - tuning} run(s) not shown: made with command-line overrides or by an earlier version "
                     f"of the experiment file; --all shows them, `gptlab runs` lists them, `gptlab clean` removes them")
    return "; ".join(parts)


def _empty_note(table: pd.DataFrame) -> str:
    return ("no runs of the experiment as its file defines it now; " + hidden_note(table.attrs.get("hidden", 0)))


def render(table: pd.DataFrame, kind: str = "table", console: Any = None, width: Optional[int] = None) -> str:
    """Text for csv, md and json; for 'table', print to ``console`` (rich) and return ''."""
    _check_format(kind)
    if kind in EXPORTS:
        return export(table, kind)
    if kind == "md":
        cols = display_columns(table)
        lines = ["| " + " | ".join(_md_cell(c.header) for c in cols) + " |",
                 "|" + "|".join("---:" if c.justify == "right" else "---" for c in cols) + "|"]
        lines += ["| " + " | ".join(_md_cell(c.cells[i]) for c in cols) + " |" for i in range(len(table))]
        return "\n".join(lines + [""] + table_notes(table)) + "\n"
    _print_rich(table, console, width)
    return ""


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|")  # a | inside a cell would end it


def _check_format(kind: str) -> None:
    if kind not in FORMATS:
        raise ConfigError(f"unknown --format '{kind}'{did_you_mean(kind, FORMATS)}; formats: {', '.join(FORMATS)}")


def _print_rich(table: pd.DataFrame, console: Any, width: Optional[int]) -> None:
    """Drop columns by priority until the table fits ``width``, then bring back any narrow one that fits."""
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
    for col in sorted((c for c in cols if c not in kept), key=lambda c: c.priority):
        if col.priority == NOTHING_MEASURED and any(c.priority != NOTHING_MEASURED for c in cols if c not in kept):
            continue  # an all-n/a column never takes the place of one with numbers
        trial = [c for c in cols if c in kept or c is col]
        if _natural_width(trial, len(table)) <= width:
            kept = trial
    kept = _fit_config_columns(kept, len(table), width)
    console.print(_rich_table(kept, len(table)))
    notes = table_notes(table)
    hidden = [c.header for c in cols if c not in kept]
    if hidden:
        notes.append(f"hidden at width {width}: {', '.join(hidden)} (see them with --format md)")
    for line in notes:
        console.print(Text(line, style="yellow" if line.startswith("note:") else "dim"))


def _fit_config_columns(kept: list[Column], nrows: int, width: int) -> list[Column]:
    """Only labels, config keys and essential numbers left and still too wide: fold the config
    columns' headers to their longest value (widest first), then drop config columns right to left.
    Row labels and values are never cut or wrapped."""
    configs = [c for c in kept if c.role == "config"]
    for col in sorted(configs, key=lambda c: -len(c.header)):
        excess = _natural_width(kept, nrows) - width
        if excess <= 0:
            return kept
        longest = max([len(str(x)) for x in col.cells] + [4])
        if len(col.header) > longest:
            col.wrap_at = max(longest, len(col.header) - excess)
    for col in reversed(configs):
        if _natural_width(kept, nrows) <= width:
            break
        kept = [c for c in kept if c is not col]
    return kept


def _rich_table(cols: list[Column], nrows: int):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for c in cols:
        full = max(len(str(x)) for x in [c.header, *c.cells]) if c.role == "label" else None
        t.add_column(Text(c.header), justify=c.justify, no_wrap=not c.wrap_at,
                     overflow="fold" if c.wrap_at else "ellipsis", min_width=c.wrap_at or full, max_width=c.wrap_at)
    for i in range(nrows):
        t.add_row(*[Text(str(c.cells[i]), style=(c.styles[i] if c.styles else "")) for c in cols])
    return t


def _natural_width(cols: list[Column], nrows: int) -> int:
    """The width the table would take with no limit (measured on a throwaway console)."""
    from rich.console import Console

    wide = Console(width=100_000, file=io.StringIO())
    return wide.measure(_rich_table(cols, nrows)).maximum


# -- cells -------------------------------------------------------------------------------------
def _short_names(keys: list[str]) -> dict[str, str]:
    """Key without its section as the header (a component option keeps its component: position.base),
    or the full key when two headers would clash."""
    last = [".".join(k.split(".")[1:]) or k for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _row_label(table: pd.DataFrame, i: int) -> str:
    return ",".join(cell_text(table[k].iloc[i]) for k in table.attrs["group_cols"])


def _status_text(row: pd.Series) -> str:
    parts = [f"{int(row[f'n_{s}'])} {s}" for s in TROUBLE if row[f"n_{s}"]]
    return ", ".join(parts) or "ok"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return fmt.NA
    return f"{mean:.4f}" + (f" ± {std:.4f}" if not math.isnan(std) else "")


def _delta_text(row: pd.Series) -> str:
    if row["baseline"]:
        return "baseline"
    d, lo, hi = row["delta"], row["delta_ci_low"], row["delta_ci_high"]
    if math.isnan(d):
        return fmt.NA
    if math.isnan(lo):
        return f"{d:+.4f} (n<2)"
    return f"{d:+.4f} ± {(hi - lo) / 2:.4f}" + (" *" if row["significant"] else "")


def _estimates(table: pd.DataFrame) -> list:
    return list(table["memory_estimate"]) if "memory_estimate" in table else [math.nan] * len(table)


def _memory(peak: float, estimate: float) -> str:
    """The measured CUDA peak; elsewhere the analytic estimate, marked with ~."""
    if not fmt.missing(peak):
        return fmt.nbytes(peak)
    return fmt.NA if fmt.missing(estimate) else "~" + fmt.nbytes(estimate)
