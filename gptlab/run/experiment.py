"""Experiment files: load a YAML, check every key, expand variants x grid x seeds into runs.

A run's identity is the hash of its fully resolved config (model, data, train) plus its seed,
so renaming a variant or reordering the YAML never reruns anything, and any change does.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
import itertools
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config.model import ModelConfig, parse_section, to_plain
from ..errors import ConfigError, did_you_mean, one_line
from ..hf.checkpoint import hf_model_config
from ..config.presets import apply_preset
from ..config.run import (EVALS, SECTIONS, DataConfig, RunSpec, SlurmConfig, TrainConfig, check_seeds, config_hash,
                          evals_plain, parse_evals)
from ..rundir import TUNING, run_key
from .tracking import parse_track
from .scaling import ScaleConfig, parse_scale, size_label
from .tuning import Candidate, TuneConfig, chosen_runs, overlap_warning, parse_tune, tuning_label

TOP_KEYS = ("name", "description", "plugins", "model", "data", "train", "evals", "variants", "grid", "seeds", "tune",
            "scale", "compare", "slurm", "track")
#: what a run's config holds: the sections, and its evals (a variant and the command line set both)
RUN_KEYS = (*SECTIONS, EVALS)
COMPARE_KEYS = ("baseline", "metric", "by", "sort")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: the most runs one experiment may expand to (variants x grid points x seeds), counted before any is
#: made: each costs milliseconds to resolve and check, so 100,000 already take minutes to plan
MAX_RUNS = 100_000


@dataclass(frozen=True)
class Experiment:
    """An experiment as ``load_experiment`` made it: fixed once loaded (the command line's
    ``--track`` and ``--allow-large`` are given to the loader, never set afterwards)."""

    name: str
    description: str
    path: Optional[Path]
    plugin_modules: list  #: the ``plugins:`` list as written: module names and .py paths (a list of names, not a system)
    runs: list
    base: dict  # resolved base config as the file defines it (no variant, no command-line override)
    compare: dict
    variants: list  # variant labels in declaration order
    overrides: list = field(default_factory=list)  # key=value given on the command line
    #: config hash -> variant label of every run the file defines (no command-line override of
    #: model/data/train): what ``gptlab compare`` shows by default
    defined: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # settings that are legal but probably a mistake
    #: what each run asks Slurm for (``--launcher slurm``); the command line's flags override it
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    #: tracking sinks every run reports to (``track:``, plus ``--track``); operational, so outside
    #: every config hash, like train.checkpoint_every
    track: list = field(default_factory=list)
    #: ``--allow-large``: train models too large for this machine (preflight's memory check is skipped)
    allow_large: bool = False
    #: the ``tune:`` block, or None; with one, ``runs`` are the tuning runs until ``tuned`` adds the
    #: comparison runs of the variants whose value is chosen
    tune: Optional[TuneConfig] = None
    #: variant label -> [Candidate per tune value] (empty without ``tune:``)
    candidates: dict = field(default_factory=dict)
    #: variant label -> the chosen value, for the variants ``tuned`` decided
    chosen: dict = field(default_factory=dict)
    #: the ``scale:`` block (its ``resolved`` sizes filled in), or None
    scale: Optional[ScaleConfig] = None
    #: config hash -> (variant, size name) of every run of a ``scale:`` ladder
    ladder: dict = field(default_factory=dict)

    @property
    def comparison_runs(self) -> list:
        """With ``tune:``, the comparison runs of the variants whose value is chosen (``tuned``)."""
        return [spec for variant, cands in self.candidates.items() if variant in self.chosen
                for cand in cands if cand.value == self.chosen[variant] for spec in cand.comparison]

    @property
    def tuning_runs(self) -> list:
        return [spec for cands in self.candidates.values() for cand in cands for spec in cand.tuning]

    def tuned(self, choices: dict) -> "Experiment":
        """This experiment with the comparison runs of every variant ``choices`` decides added to
        its runs (after the tuning runs) and defined as the file's (``tuning.choose``)."""
        tuning = self.tuning_runs
        have = {(spec.config_hash, spec.seed) for spec in tuning}
        compared = chosen_runs(self.candidates, choices)
        runs = tuning + [spec for spec in compared if (spec.config_hash, spec.seed) not in have]
        # by config hash and seed: a tuning run at the chosen value shares its config, not its role
        defined = {} if self.overrides_sections else {**tuning_definition(tuning), **{
            run_key(spec.config_hash, spec.seed): spec.variant for spec in compared}}
        return dataclasses.replace(self, runs=runs, defined=defined,
                                   chosen={v: c.value for v, c in choices.items() if c.decided})

    @property
    def overrides_sections(self) -> bool:
        """Whether the command line overrides model, data or train keys (its runs are not the file's)."""
        return any(o.partition("=")[0].split(".")[0] in RUN_KEYS for o in self.overrides)


def current_definition(exp_dir: Path) -> Optional[set]:
    """Config hashes of the runs an experiment's file defines now; None when that cannot be known.

    The file named in experiment.json is read again (it may have been edited since the runs), unless
    this command has read it already (see ``reading_once``); when it is gone or no longer valid, the
    definition recorded at the last ``gptlab run`` is used. Results written before either existed
    give None: every run counts.
    """
    from ..errors import GptlabError
    from ..results.frame import recorded_definition
    from ..rundir import load_yaml as load_bounded_yaml, read_experiment

    meta = read_experiment(exp_dir)
    source = meta.get("source")
    if isinstance(source, str) and Path(source).is_file():
        try:
            if _already_read(Path(source)) is None:  # bounded, no alias bomb, before the loader sees it
                load_bounded_yaml(Path(source), aliases=True)
            exp = load_experiment(Path(source))
        except (GptlabError, OSError):
            exp = None
        if exp is not None and exp.name == meta.get("name"):
            if exp.tune is not None:  # the comparison runs at each variant's value as its tuning runs say now
                from .tuning import choose

                exp = exp.tuned(choose(exp.candidates, exp_dir, exp.tune))
            return set(exp.defined)
    return recorded_definition(exp_dir)


#: the experiment files this command has parsed, by resolved path (None outside ``reading_once``)
_READ: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("gptlab_experiment_files", default=None)


@contextmanager
def reading_once() -> Iterator[None]:
    """Within this block (one command) each experiment file is read from disk at most once: a later
    load of the same path (``current_definition`` as the final table is made) reuses that parse, so
    the whole command sees one version of the file, however long it trains."""
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def _already_read(path: Path) -> Optional[DictConfig]:
    """A copy of this command's parse of ``path``, or None when it has not read the file."""
    read = _READ.get()
    cfg = None if read is None else read.get(Path(path).resolve())
    return None if cfg is None else copy.deepcopy(cfg)


def load_yaml(path: Path) -> DictConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"experiment file {path} does not exist; check the path (shipped ones are in experiments/)")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; pass an experiment .yaml file")
    known = _already_read(path)
    if known is not None:
        return known
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:
        detail = one_line(exc, 10_000)
        raise ConfigError(f"{path}: not valid YAML: {detail}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: an experiment must be a mapping with name, model, data, train, variants, seeds")
    read = _READ.get()
    if read is not None:
        read[path.resolve()] = copy.deepcopy(cfg)
    return cfg


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=100")
    # YAML flow mappings need "key: value"; accept the compact {name:rope,base:500} a shell user types
    overrides = [_space_flow_keys(item) for item in overrides]
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # OmegaConf's own errors and YAML parse errors of a value
        detail = one_line(exc)
        raise ConfigError(f"bad override ({detail}); write key=value, and quote mappings: "
                          f"'model.position={{name: rope, base: 500}}'") from None


def _space_flow_keys(item: str) -> str:
    key, _, value = item.partition("=")
    if value.lstrip().startswith("{"):
        value = re.sub(r"(?<=[{,\s])([A-Za-z_][\w.-]*):(?!\s)", r"\1: ", value)
    return f"{key}={value}"


def _merge(where: str, *cfgs: Any) -> DictConfig:
    """OmegaConf.merge, with a clash (a list where the file has a mapping, say) as a user error."""
    try:
        return OmegaConf.merge(*cfgs)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: an override does not fit the experiment ({one_line(exc)}); "
                          f"override a value with a value of the same kind, e.g. seeds=[0,1]") from None


def _plain(cfg: Any, where: str) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {one_line(exc, 10_000)}") from None


def load_experiment(path: Path | None, overrides: list[str] = (), cfg: DictConfig | None = None,
                    plugins: Any = None, track: Any = (), allow_large: bool = False) -> Experiment:
    """Read and check an experiment, returning every run it asks for.

    ``plugins`` is where ``model: {from_hf: DIR}`` finds the importer of the checkpoint's
    ``model_type``: the plugin system the experiment will run with, or a function that builds it
    from the experiment's ``plugins:`` list (called at most once, and only for a ``from_hf``, so
    an experiment without one builds no plugin system here). None: the process-wide default system
    when the experiment lists no ``plugins:``, else one of the default folders plus those (relative
    to the YAML), as ``gptlab run`` builds without ``--plugins-dir``.

    ``track`` (``--track``: names or comma-separated names) adds tracking sinks to the file's
    ``track:`` list and ``allow_large`` (``--allow-large``) lifts the memory check: the command
    line's settings are merged here, since an Experiment cannot change once loaded. The file is
    read once (``cfg``, when given, is used instead); what it defines without the command line's
    model/data/train overrides is a second pass over that same parse.
    """
    where = str(path) if path is not None else "experiment"
    source = load_yaml(path) if cfg is None else cfg
    _check_sections(source, where)
    ov, section_ov = _split_overrides(overrides)
    cfg = _merge(where, source, ov)
    head = _head(cfg, where)
    importers = _LazyPlugins(plugins, head.plugin_modules, path)
    shape = _shape(cfg, len(head.seeds), where)._replace(base_dir=Path(path).resolve().parent if path else None)
    tune = parse_tune(_plain(cfg.get("tune"), where), head.seeds, [k for point in shape.points[:1] for k in point],
                      SECTIONS, where)
    scale = parse_scale(_plain(cfg.get("scale"), where), where)
    if scale is not None:
        scale = _scale_sizes(shape, scale, tune, head.compare, section_ov, where, importers)
    runs, labels, candidates = _expand(shape, head.seeds, section_ov, where, importers, tune, scale)
    _check_compare(head.compare, runs, where)
    checked = runs if tune is None else [c.comparison[0] for cands in candidates.values() for c in cands]
    warnings = [f"{where}: variant '{spec.variant}': train.warmup_steps ({spec.train.warmup_steps}) is not shorter than "
                f"train.steps ({spec.train.steps}): the learning rate never leaves the warmup"
                for spec in (checked[::len(head.seeds)] if tune is None else checked)
                if spec.train.warmup_steps >= spec.train.steps > 0]
    warnings = list(dict.fromkeys(warnings))  # with tune: one line per variant, not per value
    if tune is not None and overlap_warning(tune, head.seeds, where):
        warnings.append(overlap_warning(tune, head.seeds, where))
    base = _resolved_base(shape.base, section_ov, where, importers)
    if tune is None:
        defined, base = _file_definition(shape, head, runs, base, bool(section_ov), where, importers, scale)
    else:  # only the tuning runs, until a value is chosen (Experiment.tuned)
        base = _resolved_base(shape.base, {}, where, importers) if section_ov else base
        defined = {} if section_ov else tuning_definition(
            [spec for cands in candidates.values() for c in cands for spec in c.tuning])
    runs = runs if tune is None else [spec for cands in candidates.values() for c in cands for spec in c.tuning]
    return Experiment(name=head.name, description=head.description, path=Path(path) if path else None,
                      plugin_modules=head.plugin_modules, runs=runs, base=base, compare=head.compare, variants=labels,
                      overrides=list(overrides), defined=defined, warnings=warnings, slurm=head.slurm,
                      track=list(dict.fromkeys([*head.track, *parse_track(track, "--track")])),
                      allow_large=bool(allow_large), tune=tune, candidates=candidates, scale=scale,
                      ladder={} if scale is None else {spec.config_hash: (spec.variant.rpartition(",size=")[0],
                                                                          spec.variant.rpartition(",size=")[2])
                                                       for spec in runs})


def tuning_definition(tuning: list) -> dict:
    """The definition's entries of tuning runs: marked, so tables keep them out of the comparison."""
    return {TUNING + run_key(spec.config_hash, spec.seed): spec.variant for spec in tuning}


def _check_sections(cfg: DictConfig, where: str) -> None:
    for key in cfg.keys():
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown section '{key}'{did_you_mean(key, TOP_KEYS)}; "
                              f"sections: {', '.join(TOP_KEYS)}")


def _split_overrides(overrides: list[str]) -> tuple[DictConfig, dict]:
    """The command line's key=value pairs: (top-level settings, model/data/train sections)."""
    ov = parse_overrides(list(overrides))
    for key in ov.keys():
        if key not in TOP_KEYS or key in ("variants", "grid"):
            allowed = [k for k in TOP_KEYS if k not in ("variants", "grid")]
            raise ConfigError(f"override '{key}': unknown section{did_you_mean(key, allowed)}; "
                              f"override one of {', '.join(allowed)} (e.g. train.steps=100)")
    section_ov = {k: ov[k] for k in RUN_KEYS if k in ov}  # evals=... beats the variants' evals too
    for k in RUN_KEYS:
        if k in ov:
            del ov[k]
    return ov, section_ov


class _Head(NamedTuple):
    """An experiment's settings beside its runs."""

    name: str
    description: str
    plugin_modules: list
    seeds: list
    compare: dict
    slurm: SlurmConfig
    track: list


def _head(cfg: DictConfig, where: str) -> _Head:
    try:
        name = cfg.get("name")
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {one_line(exc, 10_000)}") from None
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' must be a folder-safe string (letters, digits, _ . -), got {name!r}")
    description = cfg.get("description") or ""
    plugin_modules = _plain(cfg.get("plugins"), where) or []
    if not isinstance(plugin_modules, list) or not all(isinstance(p, str) for p in plugin_modules):
        raise ConfigError(f"{where}: 'plugins' must be a list of module names or .py paths")
    seeds = check_seeds(_plain(cfg.get("seeds", [0]), where), "'seeds'", "[0, 1, 2]", where)
    compare = _plain(cfg.get("compare"), where) or {}
    if not isinstance(compare, dict):
        raise ConfigError(f"{where}: 'compare' must be a mapping with {', '.join(COMPARE_KEYS)}")
    for key in compare:
        if key not in COMPARE_KEYS:
            raise ConfigError(f"{where}: unknown compare key '{key}'{did_you_mean(key, COMPARE_KEYS)}")
    try:
        slurm = parse_section(SlurmConfig, _plain(cfg.get("slurm"), where), "slurm")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    track = parse_track(_plain(cfg.get("track"), where), where)
    return _Head(name, str(description), plugin_modules, seeds, compare, slurm, track)


class _Shape(NamedTuple):
    """The base sections, the variants and the grid points, before any run is resolved."""

    base: DictConfig
    variants: list  # [(name, partial config)]; [("base", {})] when the file names none
    named: bool  # whether the file names variants
    points: list  # grid points, [{}] without a grid
    base_dir: Optional[Path] = None  # the experiment file's folder: where an eval's relative paths start


def _shape(cfg: DictConfig, n_seeds: int, where: str) -> _Shape:
    base = OmegaConf.create({k: cfg.get(k) or {} for k in SECTIONS})
    if cfg.get(EVALS) is not None:  # a variant's evals: replace these (lists are replaced, not merged)
        base[EVALS] = cfg.get(EVALS)
    variants = cfg.get("variants")
    if variants is None:
        variants = OmegaConf.create({})
    elif not isinstance(variants, DictConfig) or not len(variants):
        raise ConfigError(f"{where}: 'variants' must map variant names to partial configs, e.g. "
                          f"{{pre_ln: {{model: {{norm_placement: pre}}}}}}; leave it out for a single run of the base")
    items = [(str(k), v) for k, v in variants.items()] or [("base", OmegaConf.create({}))]
    grid_keys, grid_values = _grid_axes(cfg.get("grid"), where)
    _check_run_count(len(items), [len(v) for v in grid_values], n_seeds, where)
    points = [dict(zip(grid_keys, values)) for values in itertools.product(*grid_values)]
    return _Shape(base, items, bool(len(variants)), points)


def _expand(shape: _Shape, seeds: list, section_ov: dict, where: str, importers: Any,
            tune: Optional[TuneConfig] = None, scale: Optional[ScaleConfig] = None) -> tuple[list, list, dict]:
    """(runs, variant labels, tuning candidates): every variant at every grid point (or ladder
    size), with ``section_ov`` over each, per seed. With ``tune``, each variant is resolved at every
    tune value (a ``Candidate`` of tuning and comparison runs) and ``runs`` lists every comparison run."""
    runs, labels, seen, candidates = [], [], {}, {}
    for vname, vcfg in shape.variants:
        vcfg = _variant_cfg(vname, vcfg, where)
        for point, size in _points(shape, scale):
            suffix = ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in point.items())
            label = (f"{vname},{suffix}" if shape.named else suffix) if point else vname
            label = size_label(label, size["name"]) if size else label
            ctx = f"{where}: variant '{label}'" if (shape.named or point or size) else where
            labels.append(label)
            for value in ([None] if tune is None else tune.values):
                at = {} if tune is None else {tune.key: value}
                merged = _merge(f"{where}: variant '{vname}'", shape.base, vcfg, _size_cfg(size), _point_cfg(point),
                                section_ov, _point_cfg(at))
                model, data, train = _resolve(merged, ctx + (f" at {tune.key}={_short(value)}" if at else ""),
                                              importers)
                changes = {**_changes(vcfg, point), **at}
                evals = _evals(merged, ctx)
                h = RunSpec(label, 0, model, data, train, evals=evals).config_hash
                name = label if not at else f"{label} at {tune.key}={_short(value)}"
                if h in seen:
                    raise ConfigError(f"{where}: variants '{seen[h]}' and '{name}' resolve to the same config; "
                                      f"remove one or make them differ")
                seen[h] = name
                compared = [RunSpec(label, s, model, data, train, changes, evals, shape.base_dir) for s in seeds]
                runs.extend(compared)
                if tune is not None:
                    tuning = [RunSpec(tuning_label(label, tune.key, value), s, model, data, train, changes, evals,
                                      shape.base_dir)
                              for s in tune.seeds]
                    candidates.setdefault(label, []).append(Candidate(label, value, tuning, compared))
    return runs, labels, candidates


def _points(shape: _Shape, scale: Optional[ScaleConfig]) -> list[tuple[dict, Optional[dict]]]:
    """(grid point, ladder size) pairs: the grid's points, or the ladder's sizes."""
    if scale is None:
        return [(point, None) for point in shape.points]
    return [({}, size) for size in scale.resolved]


def _size_cfg(size: Optional[dict]) -> DictConfig:
    """A ladder size as config: its model keys and its step budget."""
    if size is None:
        return OmegaConf.create({})
    return OmegaConf.create({"model": size["model"], "train": {"steps": size["steps"]}})


def _scale_sizes(shape: _Shape, scale: ScaleConfig, tune: Optional[TuneConfig], compare: dict, section_ov: dict,
                 where: str, importers: Any) -> ScaleConfig:
    """The ladder with each size resolved on its baseline variant: parameters, token budget, steps
    (tokens / (batch_size x seq_len x grad_accum), at least 1)."""
    from ..config.model import parameter_parts

    if shape.points != [{}]:
        raise ConfigError(f"{where}: scale: and grid: cannot be combined; make the grid's values variants")
    if tune is not None:
        raise ConfigError(f"{where}: scale: and tune: cannot be combined yet; tune at one size, then fix the "
                          f"value in the ladder")
    names = [name for name, _ in shape.variants]
    baseline = scale.baseline or compare.get("baseline") or names[0]
    if baseline not in names:
        raise ConfigError(f"{where}: scale.baseline '{baseline}' is not a variant{did_you_mean(str(baseline), names)}; "
                          f"variants: {', '.join(names)}")
    vcfg = _variant_cfg(baseline, dict(shape.variants)[baseline], where)
    resolved, seen = [], {}
    for i, (name, keys) in enumerate(scale.sizes):
        merged = _merge(f"{where}: scale size '{name}'", shape.base, vcfg, OmegaConf.create({"model": keys}),
                        section_ov)
        model, _, train = _resolve(merged, f"{where}: scale size '{name}' of variant '{baseline}'", importers)
        parameters = sum(parameter_parts(model, importers()).values())
        if parameters in seen:
            raise ConfigError(f"{where}: scale sizes '{seen[parameters]}' and '{name}' give {baseline} the same "
                              f"{parameters:,} parameters; a size must change the model (keys the base model sets "
                              f"explicitly win over a preset's: give sizes as mappings of those keys)")
        seen[parameters] = name
        tokens = scale.budget(i, parameters)
        per_step = train.batch_size * (train.seq_len or model.context_length) * train.grad_accum
        resolved.append({"name": name, "model": keys, "parameters": parameters, "tokens": tokens,
                         "steps": max(1, round(tokens / per_step))})
    return dataclasses.replace(scale, baseline=baseline, resolved=resolved)


def _variant_cfg(name: str, vcfg: Any, where: str) -> DictConfig:
    _check_variant_name(name, where)
    if vcfg is None:
        vcfg = OmegaConf.create({})
    if not isinstance(vcfg, DictConfig):
        raise ConfigError(f"{where}: variant '{name}' must be a mapping like {{model: {{norm_placement: post}}}}")
    for key in vcfg.keys():
        if key not in RUN_KEYS:
            raise ConfigError(f"{where}: variant '{name}': unknown section '{key}'"
                              f"{did_you_mean(key, RUN_KEYS)}; a variant sets model, data or train keys, or evals")
    return vcfg


def _resolved_base(base: DictConfig, section_ov: dict, where: str, importers: Any) -> dict:
    merged = _merge(where, base, section_ov)
    model, data, train = _resolve(merged, where, importers)
    out = {"model": model.to_dict(), "data": to_plain(data), "train": to_plain(train)}
    evals = _evals(merged, where)
    if evals:
        out[EVALS] = evals_plain(evals)
    return out


def _evals(merged: DictConfig, where: str) -> tuple:
    """The evals a merged run config lists (checked for form here; names and options at preflight,
    against the registry, like every component)."""
    try:
        return parse_evals(_plain(merged.get(EVALS), where))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _file_definition(shape: _Shape, head: _Head, runs: list, base: dict, overridden: bool, where: str,
                     importers: Any, scale: Optional[ScaleConfig] = None) -> tuple[dict, dict]:
    """(config hash -> variant label, resolved base) of what the file defines without the command
    line's model/data/train overrides, so runs made with them are set apart in tables. With such
    overrides this is a second pass over the same parse (the same plugins: list, the same system);
    when the file is only valid with them, no run is as the file defines it."""
    if not overridden:
        return {config_hash(spec.resolved()): spec.variant for spec in runs}, base
    try:
        plain, _, _ = _expand(shape, head.seeds, {}, where, importers, None, scale)
        _check_compare(head.compare, plain, where)
        return ({config_hash(spec.resolved()): spec.variant for spec in plain},
                _resolved_base(shape.base, {}, where, importers))
    except ConfigError:
        return {}, base


def _check_compare(compare: dict, runs: list, where: str) -> None:
    """The compare block names a metric, --by keys and a baseline the runs will have, so a typo
    stops the command now rather than after all the training."""
    from ..results.frame import table_config
    from ..rundir import METRIC_ALIASES, SUMMARY_METRICS, length_key

    metric = compare.get("metric")
    if metric is not None:
        known = [*METRIC_ALIASES, *SUMMARY_METRICS,
                 *dict.fromkeys(length_key(m) for spec in runs for m in spec.train.eval_lengths)]
        evals = list(dict.fromkeys(f"{e.name}_" for spec in runs for e in spec.evals))
        # an eval's metric names are its own (hellaswag_acc): any under its prefix may be compared
        if metric not in known and not str(metric).startswith(tuple(evals)):
            known += [f"{prefix}<metric>" for prefix in evals]
            raise ConfigError(f"{where}: compare.metric '{metric}' is not a metric of these runs"
                              f"{did_you_mean(str(metric), known)}; metrics: {', '.join(known)}")
    flat = [table_config(spec.resolved()) for spec in runs]
    by = compare.get("by")
    keys = [k.strip() for k in (by.split(",") if isinstance(by, str) else by or []) if str(k).strip()]
    if keys == ["variant"]:
        keys = []
    for i, key in enumerate(keys):
        matches = [key] if key in flat[0] else [c for c in flat[0] if c.endswith("." + key)]
        if len(matches) != 1:
            raise ConfigError(f"{where}: compare.by '{key}' is not a config key{did_you_mean(key, flat[0])}; "
                              f"use dotted keys such as model.position" if not matches else
                              f"{where}: compare.by '{key}' is ambiguous ({', '.join(matches)}); use the full key")
        keys[i] = matches[0]
    baseline = compare.get("baseline")
    if baseline is not None:
        rows = list(dict.fromkeys(",".join("-" if f.get(k) is None else str(f.get(k)) for k in keys) for f in flat)
                    if keys else dict.fromkeys(spec.variant for spec in runs))
        rows += [r.rpartition(",size=")[0] for r in rows if ",size=" in r]  # a ladder's table per size
        if str(baseline) not in rows:
            raise ConfigError(f"{where}: compare.baseline '{baseline}' is not a row of the table"
                              f"{did_you_mean(str(baseline), rows)}; rows: {', '.join(rows)}")


def _check_variant_name(name: str, where: str) -> None:
    """A variant name becomes a folder name, a table label and a --baseline value: refuse the
    names that could not be all three (hidden folders, paths, control characters)."""
    bad = (not name.strip() or name.startswith((".", "-")) or "/" in name or "\\" in name or len(name) > 80
           or any(ord(c) < 32 or ord(c) == 127 for c in name))
    if bad:
        raise ConfigError(f"{where}: variant name {name!r} cannot be used: use up to 80 characters, no '/' or "
                          f"control characters, not starting with '.' or '-'")


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("name", v))
    return str(v)


def _check_run_count(n_variants: int, grid_sizes: list[int], n_seeds: int, where: str) -> None:
    """Refuse an experiment of more than MAX_RUNS runs, counted as a product before any is made."""
    points = math.prod(grid_sizes)
    runs = n_variants * points * n_seeds
    if runs > MAX_RUNS:
        grid = f" x {points:,} grid points ({' x '.join(map(str, grid_sizes))})" if grid_sizes else ""
        raise ConfigError(f"{where}: the experiment expands to {runs:,} runs ({n_variants:,} variant(s){grid} x "
                          f"{n_seeds:,} seed(s)), more than the {MAX_RUNS:,} gptlab plans at once; "
                          f"shrink the grid or split the experiment")


def _grid_axes(grid: Any, where: str) -> tuple[list, list]:
    """The grid's dotted keys and, per key, its list of values (their product is the grid)."""
    if grid is None:
        return [], []
    if not isinstance(grid, DictConfig):
        raise ConfigError(f"{where}: 'grid' must map dotted keys to lists, e.g. {{model.activation: [gelu, swiglu]}}")
    grid = _plain(grid, where)
    keys = list(grid)
    for key in keys:
        if key.split(".")[0] not in SECTIONS or "." not in key:
            raise ConfigError(f"{where}: grid key '{key}' must be a dotted config key such as model.activation")
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"{where}: grid key '{key}' needs a non-empty list of values")
    return keys, [grid[k] for k in keys]


def _point_cfg(point: dict) -> DictConfig:
    out = OmegaConf.create({})
    for key, value in point.items():
        OmegaConf.update(out, key, value, force_add=True)
    return out


class _LazyPlugins:
    """The plugin system of an experiment's ``from_hf`` importers, made on first use (see load_experiment)."""

    def __init__(self, given: Any, specs: list, path: Path | None) -> None:
        self.given, self.specs, self.path = given, list(specs), path
        self.system: Any = None

    def __call__(self) -> Any:
        if self.system is None:
            from ..plugin.manager import build_plugin_system, default_plugins

            if self.given is None and not self.specs:  # nothing of the experiment's own: the default system
                self.system = default_plugins()
            elif self.given is None:
                base_dir = Path(self.path).resolve().parent if self.path is not None else None
                self.system = build_plugin_system(extra=self.specs, base_dir=base_dir)
            elif hasattr(self.given, "registry"):  # a plugin system
                self.system = self.given
            else:
                self.system = self.given(self.specs)
        return self.system


def _resolve(merged: DictConfig, where: str, plugins: Any = None) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    plain = _plain(merged, where)
    try:
        for section in SECTIONS:
            if plain.get(section) is not None and not isinstance(plain[section], dict):
                raise ConfigError(f"{section}: expected a mapping of keys, got {plain[section]!r}")
        model = ModelConfig.from_any(apply_preset(plain.get("model") or {},
                                                  lambda source: hf_model_config(source, plugins())))
        data = parse_section(DataConfig, plain.get("data"), "data")
        train = parse_section(TrainConfig, plain.get("train"), "train")
        train.check_eval_lengths(train.seq_len or model.context_length)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return model, data, train


def _changes(vcfg: DictConfig, point: dict) -> dict:
    out = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and not (prefix.count(".") >= 1 and "name" in node):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", _plain(vcfg, "variant"))
    out.update(point)
    return out
