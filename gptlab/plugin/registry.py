"""Name-keyed registries of components, filled by plugins through the ``gptlab_register`` hook.

What a kind's factory takes and returns is written in ``gptlab.plugin.hookspecs.KINDS``; this module
only stores entries and checks a user's options against that contract.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError, PluginError, did_you_mean
from .hookspecs import KINDS, Range


@dataclass
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # the plugin that registered it
    override: bool = False
    overrides: str | None = None  # the plugin whose entry this one replaced

    @property
    def doc(self) -> str:
        text = inspect.getdoc(self.factory) or ""
        return text.strip().splitlines()[0] if text.strip() else ""


class Registry:
    """Every registered component, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}

    def add(self, kind: str, name: str, factory: Callable[..., Any], plugin: str, override: bool = False) -> None:
        if kind not in self._entries:
            raise PluginError(f"plugin {plugin}: unknown component kind '{kind}'{did_you_mean(kind, KINDS)}; "
                              f"kinds are {', '.join(KINDS)}")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin}: component names must be non-empty strings, got {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin}: factory for {kind} '{name}' is not callable")
        old = self._entries[kind].get(name)
        new = Entry(kind, name, factory, plugin, override)
        if old is not None:
            if old.override and override:
                raise PluginError(f"{kind} '{name}' is overridden by both plugin {old.plugin} and plugin {plugin}; "
                                  f"remove override=True from one of them")
            if old.override:  # an explicit override registered first wins over a plain one
                old.overrides = plugin
                return
            if not override:
                raise PluginError(f"{kind} '{name}' is registered by both plugin {old.plugin} and plugin {plugin}; "
                                  f"rename one, or pass override=True to register() to replace the other")
            new.overrides = old.plugin
        self._entries[kind][name] = new

    def lookup(self, kind: str, name: str, options: dict, cfg: Any = None) -> Entry:
        """The entry for ``name``, after checking ``options`` against it and running its ``check``.

        ``cfg`` is the model config (the train config for a schedule), for the kinds whose factory takes
        one first. Errors name the kind and entry.
        """
        entry = self.get(kind, name)
        check_options(entry, options)
        check = getattr(entry.factory, "check", None)
        if callable(check):
            args = (cfg,) if KINDS[kind].positional[:1] in (("cfg",), ("train",)) else ()
            try:
                check(*args, **_accepted_by(check, options))
            except ConfigError as exc:
                raise ConfigError(f"{kind} '{name}': {exc}") from None
        return entry

    def get(self, kind: str, name: str) -> Entry:
        if kind not in self._entries:
            raise ConfigError(f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}")
        entries = self._entries[kind]
        if name not in entries:
            raise ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, entries)}; "
                              f"registered: {', '.join(sorted(entries)) or '(none)'}")
        return entries[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = [kind] if kind else list(KINDS)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]


def check_options(entry: Entry, options: dict) -> None:
    """Fail with the valid option names when ``options`` holds one the factory does not take.

    Options are the factory's keyword arguments minus what gptlab itself passes (the kind's
    positional and reserved arguments in ``KINDS``).
    """
    kind = KINDS[entry.kind]
    try:
        params = inspect.signature(entry.factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    supplied = set(list(params)[:len(kind.positional)]) | set(kind.reserved)
    accepted = [n for n, p in params.items() if n not in supplied
                and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in options:
        if key not in accepted:
            raise ConfigError(f"{entry.kind} '{entry.name}' has no option '{key}'{did_you_mean(key, accepted)}; "
                              f"options: {', '.join(accepted) or '(none)'}")
    hints = _hints(entry.factory)
    for key, value in options.items():
        if key in hints:
            problem = _violation(hints[key], value)
            if problem:
                raise ConfigError(f"{entry.kind} '{entry.name}' option {key} must be {problem}, got {value!r}")


def _hints(factory: Any) -> dict:
    """The annotations of a factory's arguments (a class's ``__init__``), Annotated extras kept."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # an annotation that does not resolve checks nothing rather than crashing
        return {}


def _violation(hint: Any, value: Any) -> Optional[str]:
    """What ``value`` should have been under ``hint`` (type and Range), or None when it fits."""
    bounds = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        bounds = next((e for e in extras if isinstance(e, Range)), None)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        return None if type(None) in options else _describe(options, bounds)
    for option in options:
        if option is type(None):
            continue
        if _is(option, value):
            if bounds is not None and isinstance(value, (int, float)) and not (
                    math.isfinite(value) and bounds.holds(value)):
                return _describe(options, bounds)
            return None
    return _describe(options, bounds)


def _is(option: Any, value: Any) -> bool:
    origin = typing.get_origin(option) or option
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(options: tuple, bounds: Optional[Range]) -> str:
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list",
             type(None): "null"}
    words = []
    for option in options:
        base = typing.get_origin(option) or option
        word = names.get(base, getattr(base, "__name__", str(base)))
        words.append(word + (f" {bounds.describe()}" if bounds is not None and base in (int, float) else ""))
    return " or ".join(dict.fromkeys(words))


def _accepted_by(fn: Any, options: dict) -> dict:
    """The options ``fn`` can take (a subclass may add options its base's ``check`` never heard of)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


# ---------------------------------------------------------------------------------------------
# Describing a factory's options (``gptlab components``)
# ---------------------------------------------------------------------------------------------
def describe_options(kind: str, factory: Any) -> list[dict]:
    """The options a factory of ``kind`` takes, as ``check_options`` reads them, in signature order.

    Each is ``{"name", "required", "default", "type", "range"}``: ``default`` is the keyword's
    default as JSON (a value JSON cannot hold as its ``repr`` text; absent when ``required``),
    ``type`` the annotation in words with its bounds ("number > 0", "integer >= 1 or null"; null
    when unannotated) and ``range`` the ``Range`` bounds ({"gt": 0}; null when none). A kind
    that takes no options, or a factory without a readable signature, gives [].
    """
    spec = KINDS[kind]
    if not spec.options:
        return []
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    supplied = set(list(params)[:len(spec.positional)]) | set(spec.reserved)
    hints = _hints(factory)
    out = []
    for name, p in params.items():
        if name in supplied or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        hint = hints.get(name, p.annotation)
        bounds = None
        if typing.get_origin(hint) is typing.Annotated:
            bounds = next((e for e in typing.get_args(hint)[1:] if isinstance(e, Range)), None)
        item: dict = {"name": name, "required": p.default is p.empty}
        if p.default is not p.empty:
            item["default"] = _json_default(p.default)
        item["type"] = _type_words(hint)
        item["range"] = ({k: v for k, v in vars(bounds).items() if v is not None} or None) if bounds else None
        out.append(item)
    return out


def _json_default(value: Any) -> Any:
    """``value`` when JSON holds it as it is (finite numbers, strings, booleans, null, lists and
    string-keyed maps of those), else its ``repr``."""
    def plain(v: Any) -> bool:
        if v is None or isinstance(v, (bool, int, str)):
            return True
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return False

    if not plain(value):
        return repr(value)
    return list(value) if isinstance(value, tuple) else value


def _type_words(hint: Any) -> Optional[str]:
    """An annotation in the words of the option errors, without articles: "number > 0 or null"."""
    if hint is inspect.Parameter.empty or hint is Any:
        return None
    bounds = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        bounds = next((e for e in extras if isinstance(e, Range)), None)
    if isinstance(hint, str):  # an annotation that did not resolve: shown as written
        return hint
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    names = {float: "number", int: "integer", bool: "true or false", str: "string", list: "list", tuple: "list",
             dict: "mapping", type(None): "null"}
    words = []
    for option in options:
        base = typing.get_origin(option) or option
        word = names.get(base, getattr(base, "__name__", str(base)))
        if bounds is not None and base in (int, float) and bounds.describe():
            word += f" {bounds.describe()}"
        words.append(word)
    words.sort(key=lambda w: w == "null")  # null last: "integer >= 1 or null"
    return " or ".join(dict.fromkeys(words))
