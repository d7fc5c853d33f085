"""The task registry: one ``TaskSpec`` per kind of experiment.

Adding a model or task to trd-hpc is one module that defines its config class, its ``Task``
and a ``SPEC``, plus its line in ``BUILTIN`` (or a ``register(SPEC)`` call from code of
your own, e.g. a plugin or a test).  The trainer, the experiment layer, the CLI, compare
and cv find it here; nothing else dispatches on the task's name.
"""

from __future__ import annotations

import importlib

from trd_hpc.config import ConfigError, register_experiment
from trd_hpc.tasks.base import Baseline, Task, TaskSpec, merge_records

# module paths, each defining SPEC
BUILTIN = (
    "trd_hpc.tasks.emt",
    "trd_hpc.tasks.cnn3d",
)

_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` (its config class then validates configs with ``task: spec.name``)."""
    have = _REGISTRY.get(spec.name)
    if have is not None and have is not spec:
        raise ValueError(f"task {spec.name!r} is already registered (by {have.make_task.__module__})")
    register_experiment(spec.name, spec.config_class)
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for mod in BUILTIN:
        spec = importlib.import_module(mod).SPEC
        if spec.name not in _REGISTRY:
            register(spec)


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> TaskSpec:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_REGISTRY))}") from None


def spec_for(cfg) -> TaskSpec:
    return get(cfg.task)


def make_task(cfg, cohort_root: str = "") -> Task:
    return spec_for(cfg).make_task(cfg, str(cohort_root))


__all__ = [
    "BUILTIN",
    "Baseline",
    "Task",
    "TaskSpec",
    "get",
    "make_task",
    "merge_records",
    "names",
    "register",
    "spec_for",
]
