"""Read run directories into a pandas DataFrame, one row per run.

The files a run leaves behind (config.yaml, summary.json, metrics.jsonl) are the only source of
truth, so every table is recomputed from them; there is no index that could drift from the disk.
Reading never writes: a run that is mid-training is detected by trying its ``.lock``, not by
touching anything.
"""
from __future__ import annotations

import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pandas as pd

from ..errors import ConfigError
from ..config.model import describe_layers
from ..config.run import SECTIONS, flatten_config
from ..rundir import (CONFIG, TUNING, run_key, EXPERIMENT, METRICS, SUMMARY, damage, finished_at, is_run_dir, load_yaml, metric_rows,
                      read_config, read_experiment, read_summary, run_status, seed_from_name, summary_oddities)

META = ("experiment", "variant", "seed", "status", "run_dir", "config_hash", "defined", "tuning", "overrides",
        "finished_at")
# The keys every metrics row has; any other key in metrics.jsonl was logged by a plugin.
STANDARD_LOG_KEYS = ("step", "tokens", "flops", "time_s", "train_loss", "val_loss", "val_bpb", "lr",
                     "tokens_per_s")
_SKIP_SUMMARY = {"changes", "plugins", "pid", "overrides"}  # config columns already say what changed


def recorded_definition(exp_dir: Path) -> Optional[set]:
    """Config hashes of the runs an experiment's file defined at its last ``gptlab run``
    (experiment.json); None for results written before that was recorded: every run counts."""
    recorded = read_experiment(exp_dir).get("defined")
    return set(recorded) if isinstance(recorded, dict) else None


def load_results(*paths: Any, results_dir: Any = "results",
                 defined_by: Callable[[Path], Optional[set]] = recorded_definition) -> pd.DataFrame:
    """One row per run under ``paths`` (run or experiment directories, or a results folder).

    Columns: experiment, variant, seed, status, run_dir, config_hash; every scalar summary value
    (dicts such as ``notes`` flattened to ``notes.val_loss@2x``); the last value of any metric a
    plugin logged to metrics.jsonl but not to the summary; and the resolved config flattened to
    dotted keys (``model.position`` = component name, ``model.position.base`` = its option).
    With no paths, every experiment under ``results_dir``. Rows follow the experiments' variant
    declaration order (a variant's runs of the file's own config first), then seed, so tables
    built from them are stable.

    ``defined`` is False for a run the experiment's file does not define (made with command-line
    overrides, or by an earlier version of the file): ``defined_by(exp_dir)`` gives the config
    hashes it defines (by default those recorded at its last run; the CLI passes
    ``gptlab.run.experiment.current_definition``, which reads the file as it stands now); a run
    directory named in ``paths`` itself always counts as defined. ``overrides`` holds the command-line overrides a
    run was made with, as typed.
    """
    run_dirs = []
    for run_dir in find_runs(paths, results_dir):
        reason = damage(run_dir)
        if reason:  # one line, and the table still prints
            sys.stderr.write(f"gptlab: warning: skipping damaged run {run_dir}: {reason}\n")
            continue
        odd = summary_oddities(read_summary(run_dir) or {})
        if odd:  # a number held as text shows as n/a: say why, once per run
            sys.stderr.write(f"gptlab: warning: run {run_dir}: {SUMMARY} holds {'; '.join(odd)} (shown as n/a)\n")
        run_dirs.append(run_dir)
    if not run_dirs:
        raise ConfigError(f"no readable runs under {', '.join(map(str, paths)) or results_dir}")
    named = {p.resolve() for p in map(Path, paths) if p.is_dir() and is_run_dir(p)}
    experiments: dict[str, dict] = {}
    defined: dict[str, Optional[set]] = {}
    rows = []
    for run_dir in run_dirs:
        exp_dir = str(run_dir.parent)
        if exp_dir not in experiments:
            experiments[exp_dir] = read_experiment(run_dir.parent, warn=True)
            defined[exp_dir] = defined_by(run_dir.parent)
        row, config = read_run(run_dir)
        known = defined[exp_dir]
        row["defined"] = (known is None or row["config_hash"] in known or run_dir.resolve() in named
                          or run_key(row["config_hash"], row["seed"]) in known)
        row["tuning"] = known is not None and TUNING + run_key(row["config_hash"], row["seed"]) in known
        declared = experiments[exp_dir].get("variants") or []
        rank = declared.index(row["variant"]) if row["variant"] in declared else len(declared)
        rows.append((list(experiments).index(exp_dir), rank, str(row["variant"]), not row["defined"],
                     str(row["config_hash"]), row["seed"] if isinstance(row["seed"], int) else -1, row, config))
    rows.sort(key=lambda r: r[:6])
    summary_cols = sorted({k for *_, row, _ in rows for k in row} - set(META))
    config_cols = list(dict.fromkeys(k for *_, config in rows for k in config))
    records = [{**row, **config} for *_, row, config in rows]
    return pd.DataFrame.from_records(records, columns=list(META) + summary_cols + config_cols)


def find_runs(paths: Iterable[Any], results_dir: Any = "results") -> list[Path]:
    """Run directories under each path (a run, an experiment, or a folder of experiments)."""
    paths = [Path(p) for p in paths]
    if not paths:
        root = Path(results_dir)
        if not root.is_dir():
            raise ConfigError(f"results directory {root} does not exist; run an experiment first "
                              f"(gptlab run EXPERIMENT.yaml) or pass --results-dir / a path")
        paths = [root]
    found: dict[Path, Path] = {}
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path} does not exist; pass a run directory or an experiment directory "
                              f"(results/<experiment>)")
        if path.is_file() and path.name in (SUMMARY, CONFIG, EXPERIMENT, METRICS):
            path = path.parent
        if not path.is_dir():
            raise ConfigError(f"{path} is not a directory; pass a run or experiment directory")
        runs = _walk(path, depth=2)
        if not runs:
            raise ConfigError(f"no runs found under {path}; a run directory holds config.yaml and summary.json")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def _walk(path: Path, depth: int) -> list[Path]:
    if is_run_dir(path):
        return [path]
    if depth == 0:
        return []
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [run for child in children for run in _walk(child, depth - 1)]


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(meta + summary + plugin metrics, flattened config) of one run directory."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    summary = read_summary(run_dir) or {}
    row: dict[str, Any] = {
        "experiment": summary.get("experiment") or config.get("experiment") or run_dir.parent.name,
        "variant": summary.get("variant") or config.get("variant") or run_dir.name.split("__")[0],
        "seed": _first(summary.get("seed"), config.get("seed"), seed_from_name(run_dir.name)),
        "status": run_status(run_dir, summary),
        "run_dir": str(run_dir),
        "config_hash": summary.get("config_hash") or config.get("config_hash"),
        "finished_at": finished_at(run_dir, summary),
    }
    row["overrides"] = " ".join(map(str, summary.get("overrides") or config.get("overrides") or []))
    for key, value in summary.items():
        if key in META or key in _SKIP_SUMMARY:
            continue
        if isinstance(value, dict):
            row.update({f"{key}.{k}": _scalar(v) for k, v in value.items()})
        else:
            row[key] = _scalar(value)
    metrics = read_metrics(run_dir)
    for col in metrics.columns:  # summary first: a plugin metric only fills a gap
        if col not in STANDARD_LOG_KEYS and col not in row:
            last = metrics[col].dropna()
            row[col] = _scalar(last.iloc[-1]) if len(last) else None
    return row, table_config(config)


def table_config(config: dict) -> dict:
    """A run's model/data/train config as table columns: dotted keys, lists and mappings as JSON, a
    per-layer layout in words ('layers 3,7: position=none'; 'uniform' when there is none)."""
    out = flatten_config(config, _scalar)
    model = config.get("model")
    if isinstance(model, dict) and "model.layers" in out:
        try:
            rules = model.get("layers") or []
            out["model.layers"] = describe_layers(rules, int(model.get("n_layers"))) if rules else "uniform"
        except (ConfigError, TypeError, ValueError):
            pass  # a layout this version cannot read: its JSON text
    return out


def read_metrics(run_dir: Any) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (empty when absent). Cached on the file's mtime and size."""
    path = Path(run_dir) / METRICS
    try:
        st = path.stat()
    except OSError:
        return pd.DataFrame()
    return _read_metrics(str(path), st.st_mtime_ns, st.st_size).copy()


@lru_cache(maxsize=512)
def _read_metrics(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    return pd.DataFrame(list(metric_rows(Path(path).parent)))


def _scalar(value: Any) -> Any:
    """Lists and mappings become JSON text so every cell is hashable and survives CSV."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars from metrics.jsonl
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
