"""The training recipe: parameter groups, the optimizer and the learning-rate schedule.

``train.optimizer`` and ``train.schedule`` name registered plugins (kinds ``optimizer`` and
``schedule``); ``train.param_groups`` maps a role or a glob on parameter names to an ``lr_mult`` and
a ``weight_decay``. This module turns those into a ``torch.optim.Optimizer`` whose every param
group carries ``peak_lr`` (its rate before the schedule) and ``name`` (its rule), and sets each
group's ``lr`` once per step. Nothing here knows any optimizer or schedule by name.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Optional

import torch
from torch import nn

from ..config.run import GROUP_SETTINGS, TrainConfig
from ..errors import ConfigError, PluginError, one_line
from ..plugin.contract import ROLES, ParamInfo, Schedule
from ..plugin.manager import PluginSystem, default_plugins

#: the attribute GPTModel sets on every norm it builds, so a norm's parameters are known as such
NORM_MARK = "_gptlab_norm"


def _role(name: str, p: torch.Tensor, embeddings: set, head: Optional[int]) -> str:
    if id(p) in embeddings:
        return "embeddings"
    if head is not None and id(p) == head:
        return "head"
    return "matrices" if p.dim() >= 2 else "scalars"


def param_infos(model: nn.Module, t: TrainConfig) -> list[ParamInfo]:
    """Every trainable parameter of ``model`` (a tied tensor once) with its role and the settings
    ``t.param_groups`` gives it. A glob beats a role for the keys it sets; two globs that set one key
    of one parameter to different values, or a rule that matches nothing, raise ConfigError."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    head_id = id(head.weight) if isinstance(head, nn.Linear) and id(head.weight) not in embeddings else None
    norms = {id(p) for m in model.modules() if getattr(m, NORM_MARK, False) for p in m.parameters()}
    rules = t.param_groups
    globs = [rule for rule in rules if rule not in ROLES]
    matched = dict.fromkeys(rules, 0)
    infos = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = _role(name, p, embeddings, head_id)
        settings = {"lr_mult": 1.0, "weight_decay": t.weight_decay if p.dim() >= 2 else 0.0}
        group = "decay" if p.dim() >= 2 else "no_decay"
        if role in rules:
            settings.update(rules[role])
            group, matched[role] = role, matched[role] + 1
        mine = [rule for rule in globs if fnmatchcase(name, rule)]
        for key in GROUP_SETTINGS:
            values = {rules[rule][key] for rule in mine if key in rules[rule]}
            if len(values) > 1:
                raise ConfigError(f"train.param_groups: {' and '.join(repr(r) for r in mine)} both match {name} and "
                                  f"set {key} to different values; narrow one glob")
        for rule in mine:
            settings.update(rules[rule])
            matched[rule] += 1
        if mine:
            group = ",".join(mine)
        infos.append(ParamInfo(name=name, param=p, role=role, norm=id(p) in norms, bias=name.endswith("bias"),
                               lr_mult=float(settings["lr_mult"]), weight_decay=float(settings["weight_decay"]),
                               group=group))
    for rule, hits in matched.items():
        if not hits:
            raise ConfigError(_no_match(rule, infos, head is not None and head_id is None))
    return infos


def _no_match(rule: str, infos: list[ParamInfo], tied: bool) -> str:
    where = f"train.param_groups.{rule} matches no parameter of this model"
    if rule == "head" and tied:
        return f"{where}: the head is tied to the token embedding (model.tie_embeddings); use 'embeddings'"
    if rule in ROLES:
        return f"{where}; the roles it has: {', '.join(sorted({i.role for i in infos}))}"
    names = ", ".join(i.name for i in infos[:3])
    return (f"{where}; a rule is a role ({', '.join(ROLES)}) or a glob on parameter names, which look like "
            f"{names}, ... (e.g. 'blocks.*.attn.*')")


def param_groups(params: list[ParamInfo], lr: float, **extra: Any) -> list[dict]:
    """torch param groups for ``params``: one per (group, lr_mult, weight_decay), in the order the
    parameters come, each with ``lr`` = ``lr`` x lr_mult, its ``weight_decay``, ``name`` (the group)
    and ``extra``. With no ``train.param_groups`` this is AdamW's classic split: decay on tensors of
    2+ dimensions, none below."""
    groups: dict[tuple, dict] = {}
    for info in params:
        key = (info.group, info.lr_mult, info.weight_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * info.lr_mult, "weight_decay": info.weight_decay,
                           "name": info.group, **extra}
        groups[key]["params"].append(info.param)
    out = list(groups.values())
    rates: dict = {}
    for group in out:  # one name, one rate: a glob that sets only weight_decay can span two lr_mults
        rates.setdefault(group["name"], set()).add(group["lr"])
    for group in out:
        if len(rates[group["name"]]) > 1:
            group["name"] = f"{group['name']}@x{group['lr'] / lr:g}" if lr else group["name"]
    return out


def _lookup(plugins: PluginSystem, kind: str, spec: Any, t: Optional[TrainConfig]) -> Any:
    """The registry entry for ``train.<kind>``; errors name the key (unknown names get a did-you-mean)."""
    try:
        return plugins.registry.lookup(kind, spec.name, spec.options, t)
    except ConfigError as exc:
        raise ConfigError(f"train.{kind}: {exc}") from None


def make_optimizer(model: nn.Module, t: TrainConfig, plugins: Optional[PluginSystem] = None) -> torch.optim.Optimizer:
    """The optimizer ``t.optimizer`` names, over ``model``'s trainable parameters grouped per
    ``t.param_groups``; each param group gets ``peak_lr`` (its lr as built) and a ``name``."""
    plugins = plugins or default_plugins()
    spec = t.optimizer
    entry = _lookup(plugins, "optimizer", spec, None)
    infos = param_infos(model, t)
    try:
        optimizer = entry.factory(infos, t, **spec.options)
    except ConfigError as exc:
        raise ConfigError(f"train.optimizer '{spec.name}': {exc}") from None
    except Exception as exc:  # torch rejected a value the option types let through
        raise ConfigError(f"train.optimizer '{spec.name}' cannot be built ({one_line(exc, kind=True)}); "
                          f"check train.optimizer={spec.to_plain()}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PluginError(f"optimizer '{spec.name}' (plugin {entry.plugin}) returned {type(optimizer).__name__}, "
                          f"not a torch.optim.Optimizer")
    covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [i.name for i in infos if id(i.param) not in covered]
    if missing:
        raise PluginError(f"optimizer '{spec.name}' (plugin {entry.plugin}) leaves {missing[0]} untrained; "
                          f"give every parameter it receives to the optimizer")
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
        group.setdefault("name", "default")
    return optimizer


def make_schedule(t: TrainConfig, plugins: Optional[PluginSystem] = None) -> Schedule:
    """The schedule ``t.schedule`` names, built for this run's length."""
    plugins = plugins or default_plugins()
    spec = t.schedule
    entry = _lookup(plugins, "schedule", spec, t)
    try:
        schedule = entry.factory(t, **spec.options)
    except ConfigError as exc:
        raise ConfigError(f"train.schedule '{spec.name}': {exc}") from None
    except Exception as exc:
        raise ConfigError(f"train.schedule '{spec.name}' cannot be built ({one_line(exc, kind=True)}); "
                          f"check train.schedule={spec.to_plain()}") from None
    if not callable(getattr(schedule, "lr", None)):
        raise PluginError(f"schedule '{spec.name}' (plugin {entry.plugin}) returned {type(schedule).__name__}, "
                          f"not a gptlab.Schedule")
    return schedule


def check_recipe(model: nn.Module, t: TrainConfig, plugins: PluginSystem) -> None:
    """Build the optimizer and schedule once (on a meta-device model: nothing is allocated) and
    ask the schedule for every step's rate, so a bad option, a rule that matches nothing or a
    schedule that fails mid-run is a user error before anything trains."""
    make_optimizer(model, t, plugins)
    schedule = make_schedule(t, plugins)
    for step in _probe_steps(t):
        try:
            rate = schedule.multiplier(step)
        except Exception as exc:
            raise ConfigError(f"train.schedule '{t.schedule.name}' fails at step {step} "
                              f"({one_line(exc, kind=True)})") from None
        if not (isinstance(rate, (int, float)) and rate == rate and 0 <= rate < float("inf")):
            raise ConfigError(f"train.schedule '{t.schedule.name}' gives the multiplier {rate!r} at step {step}; "
                              f"a schedule gives a finite number >= 0")


def _probe_steps(t: TrainConfig) -> list[int]:
    """Steps a schedule is asked for before training: every step of a short run, else the edges."""
    if t.steps <= 10_000:
        return list(range(1, t.steps + 1))
    marks = {1, t.steps, t.warmup_steps, t.warmup_steps + 1, *range(1, t.steps + 1, max(1, t.steps // 1000))}
    return sorted(s for s in marks if 1 <= s <= t.steps)


def set_rates(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> dict[str, float]:
    """Set every group's lr for ``step`` from its ``peak_lr``; returns group name -> lr."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr(step, group["peak_lr"], group["name"])
        rates.setdefault(group["name"], group["lr"])
    return rates
