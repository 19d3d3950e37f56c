"""The hooks a gptlab plugin can implement.

Mark implementations with ``@gptlab.hookimpl``. Registration happens once, when the plugin loads;
the lifecycle hooks observe a run at log intervals, never inside the forward pass, so the plugin
system costs nothing per training step.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

hookspec = pluggy.HookspecMarker("gptlab")
hookimpl = pluggy.HookimplMarker("gptlab")


@hookspec
def gptlab_register(register: Callable[..., None]) -> None:
    """Register components: call ``register(kind, name, factory, override=False)``.

    kind is one of attention, position, norm, norm_placement, activation, dataset, tokenizer.
    The factory's docstring (first line) is what ``gptlab components`` shows. Registering a
    (kind, name) that another plugin already registered is an error unless ``override=True``.
    """


@hookspec
def gptlab_run_start(run: Any) -> None:
    """A run is about to train. ``run`` has ``.dir``, ``.name``, ``.seed`` and ``.config``."""


@hookspec
def gptlab_log(run: Any, step: int, metrics: Mapping[str, float]) -> None:
    """A metrics row was logged (every ``train.log_every`` steps)."""


@hookspec
def gptlab_eval(run: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Validation finished at ``step``; ``metrics`` holds val_loss (and any extra lengths)."""


@hookspec
def gptlab_run_end(run: Any, summary: Mapping[str, Any]) -> None:
    """A run ended (completed, diverged, failed or interrupted); ``summary`` is what was saved."""
