"""Tracking sinks (TensorBoard, W&B, MLflow, a user's own): what the core and the sink plugins share.

A sink is an ordinary plugin: it registers a ``tracker`` (whose factory says, before anything
trains, whether the sink can work) and implements the lifecycle hooks. The core's part is here:
``check_trackers`` turns an unknown name or a missing package into a one-line error at start, and
``RunHooks`` calls each plugin's lifecycle hooks on its own, so a sink that raises is reported
once and switched off for the rest of the run instead of failing it. The rest are small helpers
the built-in sinks share (flattened config, metric names every backend accepts, a writer thread).
Nothing here imports torch or any tracking package.
"""
from __future__ import annotations

import math
import queue
import re
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from ..errors import ConfigError, did_you_mean, import_extra, one_line

TRACKER = "tracker"  # the registered kind


# ---------------------------------------------------------------------------------------------
# Choosing sinks
# ---------------------------------------------------------------------------------------------
def parse_track(value: Any, where: str) -> list[str]:
    """``track:`` of an experiment or ``--track``: a name, a comma-separated string or a list of them."""
    items = value if isinstance(value, (list, tuple)) else [value] if value is not None else []
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: 'track' must list tracker names, e.g. [tensorboard, mlflow], got {item!r}")
        names.extend(part.strip() for part in item.split(",") if part.strip())
    return list(dict.fromkeys(names))


def check_trackers(names: Iterable[str], plugins: Any, where: str = "track") -> None:
    """Each chosen tracker is registered and ready (its package imports), before anything trains.
    A tracker's check must not write anything: --dry-run makes it too."""
    registry, names = plugins.registry, list(names)
    known = registry.names(TRACKER)
    for name in names:  # every name first: no sink's check runs for a command that is refused anyway
        if name not in known:
            raise ConfigError(f"{where}: unknown tracker '{name}'{did_you_mean(name, known)}; "
                              f"known trackers: {', '.join(known) or '(none)'}")
    for name in names:
        entry = registry.lookup(TRACKER, name, {})
        try:
            entry.factory()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except Exception as exc:  # a sink's own check that broke: still a one-line answer at start
            raise ConfigError(f"{where}: tracker '{name}' cannot start ({one_line(exc, kind=True)})") from None


def require(module: str, extra: str, tracker: str) -> Any:
    """Import ``module`` for ``tracker``, or say which optional extra installs it (a tracker factory's body)."""
    return import_extra(module, f"tracker '{tracker}'", extra)


def trackers_of(plugins: Any) -> dict[str, list[str]]:
    """Plugin name -> the trackers it registered."""
    out: dict[str, list[str]] = {}
    for info in getattr(plugins, "plugins", ()):
        names = [c.split(":", 1)[1] for c in info.components if c.startswith(TRACKER + ":")]
        if names:
            out[info.name] = names
    return out


# ---------------------------------------------------------------------------------------------
# Calling the lifecycle hooks of one run
# ---------------------------------------------------------------------------------------------
class RunHooks:
    """The lifecycle hooks of one run, called one plugin at a time.

    Why not ``pm.hook.gptlab_log(...)``: pluggy stops at the first exception, so one broken sink
    would end every other plugin's call and the run. Here a plugin that raises anything short of
    a keyboard interrupt (SystemExit included; Ctrl-C still stops the run) is warned about once, recorded (``hook_errors`` in the summary)
    and skipped for the rest of the run. A tracker plugin is called only when the run chose one
    of its trackers. The time each plugin's hooks take is summed (``hook_seconds``).
    """

    def __init__(self, plugins: Any, run: Any, warn: Callable[[str], None] = lambda message: None) -> None:
        self.pm, self.warn = plugins.pm, warn
        chosen = set(run.config.get("track") or ())
        owned = trackers_of(plugins)
        self.labels = {p: f"tracker '{'/'.join(names)}' (plugin {p})" for p, names in owned.items()}
        self.skipped = {p for p, names in owned.items() if not chosen & set(names)}
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, hook: str, **kwargs: Any) -> None:
        by_plugin: dict[str, list] = {}
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):  # pluggy's own calling order
            by_plugin.setdefault(impl.plugin_name, []).append(impl)
        for name, impls in by_plugin.items():
            if name in self.skipped or name in self.errors:
                continue
            start = time.perf_counter()
            try:
                if any(impl.hookwrapper or getattr(impl, "wrapper", False) for impl in impls):
                    others = [p for p in self.pm.get_plugins() if p is not impls[0].plugin]
                    self.pm.subset_hook_caller(hook, others)(**kwargs)  # pluggy runs the wrapper
                else:
                    for impl in impls:
                        impl.function(*(kwargs[arg] for arg in impl.argnames))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit too: a sink calling sys.exit must not end the run
                self._failed(name, hook, kwargs, exc)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _failed(self, name: str, hook: str, kwargs: dict, exc: BaseException) -> None:
        at = f" at step {kwargs['step']}" if "step" in kwargs else ""
        detail = one_line(exc, 300, kind=True)
        self.errors[name] = f"{hook}{at}: {detail}"
        label = self.labels.get(name, f"plugin '{name}'")
        self.warn(f"{label} failed in {hook}{at} ({detail}); it is switched off for the rest of this run")

    def record(self) -> dict:
        """What the run's summary keeps: each called plugin's hook time, and what failed."""
        out: dict[str, Any] = {}
        if self.seconds:
            out["hook_seconds"] = {name: round(s, 6) for name, s in self.seconds.items()}
        if self.errors:
            out["hook_errors"] = dict(self.errors)
        return out


# ---------------------------------------------------------------------------------------------
# Helpers for sinks
# ---------------------------------------------------------------------------------------------
_BAD = re.compile(r"[^A-Za-z0-9_./ -]")


def metric_key(key: str) -> str:
    """A metric name every backend accepts: ``val_loss@2x`` -> ``val_loss_at_2x`` (MLflow and
    TensorBoard refuse '@'); the standard names (train_loss, val_loss, lr, ...) are unchanged."""
    return _BAD.sub("_", key.replace("@", "_at_"))


def number(value: Any) -> Optional[float]:
    """``value`` as a finite float, or None (None, NaN, inf, strings, lists are not logged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as {name: value}, without the step and without missing values."""
    out = {}
    for key, value in row.items():
        if key != "step" and (v := number(value)) is not None:
            out[metric_key(key)] = v
    return out


#: summary.json numbers a sink reports at the end, under these names (the run's mean throughput must
#: not land on the last row's tokens_per_s curve)
FINAL_KEYS = {"final_train_loss": "final_train_loss", "final_val_loss": "final_val_loss",
              "best_val_loss": "best_val_loss", "tokens_per_s": "mean_tokens_per_s", "mfu": "mfu",
              "wall_time_s": "wall_time_s", "train_time_s": "train_time_s", "parameters": "parameters"}


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a finished run's summary adds to its curves: final/best losses, mean throughput,
    the losses at other lengths (``val_loss@Nx`` -> ``val_loss_at_Nx``) and each eval's final
    metrics (``hellaswag_acc`` -> ``final_hellaswag_acc``, as ``final_val_loss`` beside the curve)."""
    out = {}
    for key, value in summary.items():
        if key in FINAL_KEYS or key.startswith("val_loss@"):
            if (v := number(value)) is not None:
                out[FINAL_KEYS.get(key) or metric_key(key)] = v
    evals = summary.get("eval_metrics")
    for key in evals if isinstance(evals, list) else ():
        if isinstance(key, str) and (v := number(summary.get(key))) is not None:
            out[f"final_{metric_key(key)}"] = v
    return out


def grad_norms(summary: Mapping[str, Any]) -> dict[str, float]:
    """``init_grad_norms`` (one per block, input side first) as ``init_grad_norm/block_I``."""
    norms = summary.get("init_grad_norms") or []
    return {f"init_grad_norm/block_{i}": v for i, value in enumerate(norms) if (v := number(value)) is not None}


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """model/data/train as dotted keys with values a tracker accepts as params and hparams: int,
    float, bool or str (None -> "null", lists as their JSON)."""
    import json

    from ..config.run import flatten_config

    def param(value: Any) -> Any:
        if value is None:
            return "null"
        return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)

    return flatten_config(config, param)


class RunSlots:
    """What a tracking sink keeps for the run in flight, by run folder, in one place for every sink.

    ``close_stale()`` at a run's start closes (with ``close``; errors ignored, they were reported
    when the sink was switched off) whatever a run of this process left behind; ``put(run, value)``
    holds the new run's value, ``get(run)`` finds it at a log step and ``pop(run)`` takes it at the
    run's end (None where the sink is not tracking that run)."""

    def __init__(self, close: Callable[[Any], None]) -> None:
        self._close, self._held = close, {}

    def close_stale(self) -> None:
        for stale in self._held.values():
            try:
                self._close(stale)
            except Exception:  # already reported when the sink was switched off
                pass
        self._held.clear()

    def put(self, run: Any, value: Any) -> Any:
        self._held[str(run.dir)] = value
        return value

    def get(self, run: Any) -> Any:
        return self._held.get(str(run.dir))

    def pop(self, run: Any) -> Any:
        return self._held.pop(str(run.dir), None)


class Background:
    """One daemon thread that runs a sink's slow calls (database writes) in order, so a log step
    only queues them. An error there is raised at the sink's next ``submit`` or at ``close``, so
    the core reports it and switches the sink off like any other failure; the thread ends at the
    error and what was queued after it is dropped."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, kwargs = item
            try:
                fn(*args, **kwargs)
            except BaseException as exc:  # kept for the caller's thread; the thread ends here
                self._error = exc
                return

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> None:
        self._raise()
        self._queue.put((fn, args, kwargs))

    def close(self, timeout: float = 120.0) -> None:
        """Wait for every queued call (at most ``timeout`` seconds); raise the first error."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"still writing after {timeout:g} s; left behind")
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
