"""The task registry: one ``TaskSpec`` per kind of experiment.

Adding a model or task to trd-hpc is one module that defines its config class, its ``Task``
and a ``SPEC``, plus its line in ``BUILTIN`` (or a ``register(SPEC)`` call from code of
your own, e.g. a plugin or a test).  The trainer, the experiment layer, the CLI, compare
and cv find it here; nothing else dispatches on the task's name.
"""

from __future__ import annotations

from trd_hpc.config import register_experiment
from trd_hpc.registry import Registry
from trd_hpc.tasks.base import Baseline, Task, TaskSpec, merge_records

# module paths, each defining SPEC
BUILTIN = (
    "trd_hpc.tasks.emt",
    "trd_hpc.tasks.cnn3d",
)

_REGISTRY: Registry[TaskSpec] = Registry("task", BUILTIN, "SPEC", register_experiment)
# register(SPEC): its config class then validates configs with `task: SPEC.name`
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names


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
