"""``gptlab report``: the comparison tables and every run's loss curves on one HTML page.

The tables are ``compare_results``' and their cells the ones ``gptlab compare`` prints
(``display_columns``), so the page and the terminal agree by construction. Reads only results,
writes only the page, and never imports torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

REPORT_HELP = """\
EXP_DIR: experiment directories (results/<name>), run directories, or a folder of experiments,
as for gptlab compare: one table per experiment, each with its own baseline (--merge: one table).
The page holds the tables (as `gptlab compare` prints them, plus a CSV download at full precision)
and every run's validation and training loss against step or tokens (hover for values, click a
legend entry to hide a run). Everything is inline: it opens offline. Needs the report extra:
pip install -e ".[report]".
"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("report", parents=[common], help="one self-contained HTML page: comparison tables and "
                                                        "interactive loss curves",
                       epilog=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("paths", nargs="+", type=Path, metavar="EXP_DIR", help="experiment or run directories")
    r.add_argument("--html", type=Path, required=True, metavar="FILE", help="the page to write (replaced in one step)")
    r.add_argument("--by", metavar="KEY[,KEY]", help="group by config keys (default: the variant)")
    r.add_argument("--baseline", metavar="NAME", help="row the others are compared with")
    r.add_argument("--metric", metavar="NAME", help="primary metric (default: val_loss)")
    r.add_argument("--merge", action="store_true", help="one table for every experiment given")
    r.add_argument("--all", action="store_true",
                   help="also runs made with command-line overrides or by an earlier version of the file")
    r.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    import contextlib
    import datetime
    import io

    from .. import __version__
    from ..results.compare import compare_results, export
    from ..errors import import_extra
    from ..results.plots import check_target
    from ..results.report import Section, page, run_curves, subtitle, write_report
    from ..run.experiment import current_definition
    from ..results.frame import load_results
    from ..rundir import read_experiment
    from .table import _empty_note, display_columns, table_notes

    target = check_target(args.html)
    import_extra("plotly.offline", "gptlab report", "report")  # before any reading: the page cannot be made without it
    tables = compare_results(*args.paths, by=args.by, baseline=args.baseline, metric=args.metric,
                             merge=args.merge, all_runs=args.all, defined_by=current_definition)
    with contextlib.redirect_stderr(io.StringIO()):  # compare_results has already warned about damaged runs
        df = load_results(*args.paths, defined_by=current_definition)
    # the runs behind each table, split as compare_results splits them
    parts = [df] if args.merge else [part for _, part in df.groupby(df["run_dir"].map(lambda d: str(Path(d).parent)),
                                                                    sort=False)]
    sections = []
    for table, part in zip(tables, parts):
        shown = part if args.all else part[part["defined"].astype(bool)]
        exp_dirs = list(dict.fromkeys(Path(d).parent for d in part["run_dir"]))
        meta = read_experiment(exp_dirs[0]) if len(exp_dirs) == 1 else {}
        title = table.attrs.get("experiment") or "merged: " + ", ".join(dict.fromkeys(map(str, part["experiment"])))
        section = Section(title=str(title), description=str(meta.get("description") or ""),
                          runs=run_curves(shown.reset_index(drop=True)))
        if len(table):
            section.columns = [(c.header, c.cells, c.justify, c.styles) for c in display_columns(table)]
            section.notes = table_notes(table)
            section.csv = export(table, "csv")
        else:
            section.empty = _empty_note(table)
        sections.append(section)
    names = ", ".join(s.title for s in sections)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    write_report(target, page(sections, f"gptlab report: {names}", subtitle(args.paths, __version__, when)))
    runs = sum(len(s.runs) for s in sections)
    print(f"wrote {target} ({len(sections)} table(s), {runs} runs)")
    return 0
