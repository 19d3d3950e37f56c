"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class GptlabError(Exception):
    """A problem with the user's input (config, experiment, plugin, path)."""


class ConfigError(GptlabError, ValueError):
    """A config key, value or type is wrong."""


class PluginError(GptlabError):
    """A plugin failed to import, collided with another, or misused a hook."""


class IncompatibleComponents(ConfigError):
    """Two chosen components cannot work together."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DamagedFile(ConfigError):
    """A file gptlab reads back is not what it writes: too large, not a regular file (a link to
    /dev/zero, a FIFO), not parseable, or holding the wrong types. ``path`` names it; ``reason``
    says what is wrong, as a predicate ("is not a JSON object")."""

    def __init__(self, path: object, reason: str = "is damaged") -> None:
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"


def one_line(exc: BaseException, limit: int = 200, kind: bool = False) -> str:
    """``exc``'s message squeezed onto one line of at most ``limit`` characters (with ``kind``,
    after its type: "RuntimeError: ..."): how an error from elsewhere is quoted in a one-line error."""
    text = f"{type(exc).__name__}: {exc}" if kind else str(exc)
    return " ".join(text.split())[:limit]


def import_extra(module: str, needed_by: str, extra: str) -> Any:
    """Import ``module``, a package an optional extra provides, or raise ConfigError saying who
    needs it and how to install it (``pip install "gptlab[extra]"``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{needed_by} needs the {module.split('.')[0]} package, which cannot be imported "
                          f"({one_line(exc, 120, kind=True)}); install it with pip install \"gptlab[{extra}]\" "
                          f"(in a checkout: pip install -e \".[{extra}]\")") from None
