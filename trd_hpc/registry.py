"""A name -> entry table whose built-in entries are imported on first use.

Used for tasks (``trd_hpc.tasks``) and cohort kinds (``trd_hpc.data.kinds``): each entry has
a ``name`` and a ``config_class``, and registering it makes the config layer validate that
name with that class (the config layer never imports the registries)."""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from trd_hpc.errors import ConfigError

T = TypeVar("T")

# The papers that ship with trd-hpc: one folder each under trd_hpc/tasks/ holding
#   config.py    EXPERIMENT, COHORTS, INGEST_SPEC (the config layer registers them by name)
#   spec.py      SPEC, the task's registry entry (trd_hpc.tasks)
#   cohort.py    KIND, the synthetic cohort kind; ingested.py: KIND, the ingested one
#   configs/, sweeps/  the paper's experiment configs and sweep specs (package data)
# A task of your own registers itself instead (trd_hpc.tasks.register, trd_hpc.data.kinds.register).
BUILTIN_TASKS = ("emt", "cnn3d")

# Modules of your own that register tasks or cohort kinds when imported: the entry points of
# group "trd_hpc.plugins" of installed packages, and the comma-separated module names in
# $TRD_HPC_PLUGINS (the processes a command starts inherit it, so a `trd-hpc reproduce` or
# `submit` of a task of your own finds it in every stage and job).
PLUGIN_GROUP = "trd_hpc.plugins"
PLUGIN_ENV = "TRD_HPC_PLUGINS"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every plugin module once (each calls trd_hpc.tasks.register / data.kinds.register)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import os
    from importlib.metadata import entry_points

    names = [ep.value for ep in entry_points(group=PLUGIN_GROUP)]
    names += [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name.split(":")[0])
        except ImportError as e:
            raise ConfigError(
                f"plugin {name!r} (${PLUGIN_ENV} or entry point {PLUGIN_GROUP}) cannot be imported: {e}"
            ) from e


class Registry(Generic[T]):
    def __init__(self, what: str, builtin: tuple[str, ...], attr: str, on_register: Callable[[str, type], None]):
        self.what, self.builtin, self.attr, self.on_register = what, builtin, attr, on_register
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, entry: T) -> T:
        name = entry.name  # type: ignore[attr-defined]
        have = self._entries.get(name)
        if have is not None and have is not entry:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self.on_register(name, entry.config_class)  # type: ignore[attr-defined]
        self._entries[name] = entry
        return entry

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self.builtin:  # each module defines `attr` (SPEC, KIND)
            entry = getattr(importlib.import_module(mod), self.attr)
            if entry.name not in self._entries:
                self.register(entry)
        load_plugins()

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r}; registered: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)
