"""Plugin discovery and loading.

Order: built-ins (the modules ``plugins/__init__.py`` lists in ``BUILTINS``, shipped as
``gptlab.builtin_plugins``) -> installed packages exposing the ``gptlab`` entry-point group ->
plugin directories (``./plugins`` by default, more with ``--plugins-dir``) -> modules or files
named under ``plugins:`` in an experiment. A file reached twice (by path or by identical content)
loads once. Any other file in the built-ins folder is a user's plugin, loaded and reported as one.

``plugins/manifest.json`` records what each built-in registers (keyed by the file's hash), with
each component's options (``registry.describe_options``), so the listing commands can show the
built-ins without importing them, and so without torch.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import pluggy

from . import hookspecs
from ..errors import PluginError
from .registry import Entry, Registry, describe_options


@dataclass
class PluginInfo:
    name: str
    source: str  # builtin | entry-point | plugins-dir | experiment
    location: str  # file path, entry point or module name
    version: str  # package version, or sha256 of the file (first 12 hex digits)
    components: list[str] = field(default_factory=list)


class _Manager(pluggy.PluginManager):
    """Treats every ``gptlab_*`` function as a hook, so a misspelled one is caught by check_pending."""

    def parse_hookimpl_opts(self, plugin: Any, name: str):  # type: ignore[override]
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("gptlab_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _version_of(module: ModuleType) -> str:
    path = getattr(module, "__file__", None)
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    return f"sha256:{_sha(Path(path))}" if path and os.path.exists(path) else "unknown"


class PluginSystem:
    """A pluggy manager plus the registry it fills; one per process or per experiment."""

    def __init__(self) -> None:
        self.pm = _Manager("gptlab")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: list[PluginInfo] = []
        self._seen_paths: set[str] = set()
        self._seen_hashes: dict[str, str] = {}
        self.build_args: dict = {}  # set by build_plugin_system: how a worker process builds its twin

    # -- loading -------------------------------------------------------------------------------
    def register_plugin(self, obj: Any, name: str, source: str, location: str, version: str) -> PluginInfo | None:
        """Register a plugin object (usually a module) and run its registration hook."""
        if self.pm.is_registered(obj):
            return None
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            raise PluginError(f"plugin {location}: {exc}; hook names are "
                              f"{', '.join(n for n in dir(hookspecs) if n.startswith('gptlab_'))}") from exc
        info = PluginInfo(name, source, location, version)
        self.plugins.append(info)
        for impl in self.pm.hook.gptlab_register.get_hookimpls():
            if impl.plugin is obj:
                def register(kind: str, cname: str, factory: Any, override: bool = False) -> None:
                    self.registry.add(kind, cname, factory, plugin=name, override=override)
                    info.components.append(f"{kind}:{cname}")
                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin {location}: gptlab_register raised {type(exc).__name__}: {exc}") from exc
        return info

    def load_file(self, path: Path, source: str) -> PluginInfo | None:
        path = Path(path)
        if not path.is_file():
            raise PluginError(f"plugin file {path} does not exist; check the path")
        real = os.path.realpath(path)
        digest = _sha(path)
        if real in self._seen_paths or digest in self._seen_hashes:
            return None  # the same plugin reached by a second route
        self._seen_paths.add(real)
        self._seen_hashes[digest] = real
        modname = f"gptlab_plugin_{path.stem}_{digest[:8]}"
        try:
            spec = importlib.util.spec_from_file_location(modname, real)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(modname, None)
            raise PluginError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc
        name = path.stem if not self.pm.has_plugin(path.stem) else f"{path.stem}@{real}"
        return self.register_plugin(module, name, source, str(path), f"sha256:{digest}")

    def load_dir(self, directory: Path, source: str = "plugins-dir", required: bool = True) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            if required:
                raise PluginError(f"plugins directory {directory} does not exist; check --plugins-dir")
            return
        for path in sorted(directory.glob("*.py")):
            if not path.name.startswith("_"):
                self.load_file(path, source)

    def load_module(self, modname: str, source: str) -> PluginInfo | None:
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            raise PluginError(f"plugin module '{modname}' failed to import: {type(exc).__name__}: {exc}") from exc
        path = getattr(module, "__file__", None)
        if path:
            real = os.path.realpath(path)
            digest = _sha(Path(real))
            if real in self._seen_paths or digest in self._seen_hashes:
                return None
            self._seen_paths.add(real)
            self._seen_hashes[digest] = real
        return self.register_plugin(module, modname, source, modname, _version_of(module))

    def load_builtins(self, folder: Path | None = None, deferred: bool = False) -> None:
        """Load the modules ``BUILTINS`` lists from ``folder`` (default: the installed copy).

        ``deferred``: register what the manifest says each unchanged file registers, without
        importing it (for listings; the factories are placeholders that cannot build anything).
        """
        from .. import builtin_plugins

        folder = Path(folder or Path(builtin_plugins.__file__).parent)
        manifest = read_manifest(folder) if deferred else {}
        for stem in builtin_plugins.BUILTINS:
            path = folder / f"{stem}.py"
            known = manifest.get(stem)
            if known and path.is_file() and f"sha256:{_sha(path)}" == known["version"] \
                    and all(len(r) == 4 for r in known.get("registers", ())):  # an older manifest lacks options
                self._register_listing(stem, path, known)
            else:
                self.load_file(path, "builtin")

    def _register_listing(self, stem: str, path: Path, known: dict) -> None:
        real = os.path.realpath(path)
        self._seen_paths.add(real)
        self._seen_hashes[known["version"][len("sha256:"):]] = real
        info = PluginInfo(stem, "builtin", str(path), known["version"])
        self.plugins.append(info)
        for kind, name, doc, options in known["registers"]:
            self.registry.add(kind, name, _Listed(doc, options), plugin=stem)
            info.components.append(f"{kind}:{name}")

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group="gptlab"):
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin entry point '{ep.name} = {ep.value}' failed to import: "
                                  f"{type(exc).__name__}: {exc}") from exc
            version = ep.dist.version if getattr(ep, "dist", None) else _version_of(obj)
            path = getattr(obj, "__file__", None)
            if path:
                real = os.path.realpath(path)
                if real in self._seen_paths:
                    continue
                self._seen_paths.add(real)
                self._seen_hashes.setdefault(_sha(Path(real)), real)
            self.register_plugin(obj, ep.name, "entry-point", f"{ep.name} = {ep.value}", version)

    def load_spec(self, spec: str, base_dir: Path | None = None) -> None:
        """Load a plugin named in an experiment: a .py file (relative to the YAML) or a module."""
        if spec.endswith(".py") or "/" in spec or os.sep in spec:
            path = Path(spec)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if path.is_dir():
                self.load_dir(path, source="experiment")
            else:
                self.load_file(path, source="experiment")
        else:
            self.load_module(spec, source="experiment")


def _checkout_builtins() -> Path | None:
    """``./plugins`` when it is a gptlab checkout's built-ins folder (its ``__init__.py`` is the
    installed one's twin): then its built-in modules *are* the built-ins, even if they differ from
    the installed copy (an edited built-in, a checkout newer than the install)."""
    from .. import builtin_plugins

    local = Path.cwd() / "plugins" / "__init__.py"
    installed = Path(builtin_plugins.__file__)
    try:
        if local.resolve() != installed.resolve() and local.read_bytes() == installed.read_bytes():
            return local.parent
    except OSError:
        pass
    return None


def build_plugin_system(plugin_dirs: Iterable[Path] = (), default_dir: bool = True,
                        extra: Iterable[str] = (), base_dir: Path | None = None,
                        listing: bool = False) -> PluginSystem:
    """Discover plugins in the documented order and return the filled system.

    ``listing``: for ``gptlab plugins/components`` only; unchanged built-ins are taken from the
    manifest instead of imported, and their entries cannot build anything.
    """
    extra, plugin_dirs = list(extra), list(plugin_dirs)
    system = PluginSystem()
    # how to build the same system again, in a worker process (``gptlab run --jobs``)
    system.build_args = {"plugin_dirs": [Path(d).absolute() for d in plugin_dirs], "default_dir": default_dir,
                         "extra": list(extra), "base_dir": base_dir, "cwd": Path.cwd()}
    system.load_builtins(_checkout_builtins() if default_dir else None, deferred=listing)
    system.load_entry_points()
    if default_dir:
        system.load_dir(Path.cwd() / "plugins", required=False)
    for d in plugin_dirs:
        system.load_dir(Path(d))
    for spec in extra:
        system.load_spec(spec, base_dir)
    return system


_default: PluginSystem | None = None


def default_plugins() -> PluginSystem:
    """The process-wide plugin system used when no other is given (built lazily)."""
    global _default
    if _default is None:
        _default = build_plugin_system()
    return _default


# ---------------------------------------------------------------------------------------------
# The built-ins' manifest
# ---------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"


class _Listed:
    """Stands in for a built-in factory in a listing; carries its docstring and options, builds nothing."""

    def __init__(self, doc: str, options: list | None = None) -> None:
        self.__doc__ = doc
        self.options = list(options or [])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise PluginError("a listing's placeholder was asked to build a component; "
                          "build the plugin system without listing=True")


def entry_options(entry: Entry) -> list[dict]:
    """What ``registry.describe_options`` says of an entry's factory; for a listed built-in, what
    the manifest recorded of it."""
    if isinstance(entry.factory, _Listed):
        return entry.factory.options
    return describe_options(entry.kind, entry.factory)


def read_manifest(folder: Path) -> dict:
    """{module: {"version": "sha256:...", "registers": [[kind, name, doc, options], ...]}}, or {} if unreadable."""
    from ..errors import DamagedFile
    from ..rundir import load_json

    try:
        data = load_json(Path(folder) / MANIFEST, dict)
    except (OSError, DamagedFile):
        return {}
    return data if isinstance(data, dict) else {}


def builtin_manifest(folder: Path) -> dict:
    """What each built-in in ``folder`` registers, by importing them (what the manifest must hold)."""
    from .. import builtin_plugins

    system = PluginSystem()
    system.load_builtins(folder)
    out = {}
    for info in system.plugins:
        entries = [system.registry.get(kind, name) for kind, name in (c.split(":", 1) for c in info.components)]
        regs = [[e.kind, e.name, e.doc, describe_options(e.kind, e.factory)] for e in entries]
        out[info.name] = {"version": info.version, "registers": regs}
    assert list(out) == list(builtin_plugins.BUILTINS)
    return out


def write_manifest(folder: Path | None = None) -> Path:
    """Regenerate ``plugins/manifest.json`` after changing a built-in (a test checks it is current)."""
    folder = Path(folder or Path(__file__).resolve().parents[2] / "plugins")
    path = folder / MANIFEST
    path.write_text(json.dumps(builtin_manifest(folder), indent=1) + "\n")
    return path


if __name__ == "__main__":  # python -m gptlab.plugin.manager: regenerate the built-ins' manifest
    print(write_manifest())
