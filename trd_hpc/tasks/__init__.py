"""The task registry: one ``TaskSpec`` per kind of experiment.

Each paper is one folder here (``emt/``, ``cnn3d/``: config classes, model, baselines,
cohort kinds, evaluation, reproduce recipe, configs and sweeps) listed in
``trd_hpc.registry.BUILTIN_TASKS``; a task of your own is a ``register(SPEC)`` call from
your code (a plugin named in $TRD_HPC_PLUGINS or an entry point: trd_hpc.registry).  The trainer, the experiment layer, the CLI, compare
and cv find it here; nothing else dispatches on the task's name.
"""

from __future__ import annotations

from trd_hpc.config import register_experiment
from trd_hpc.registry import BUILTIN_TASKS, Registry
from trd_hpc.tasks.base import Baseline, Task, TaskSpec, merge_records

# module paths, each defining SPEC
BUILTIN = tuple(f"trd_hpc.tasks.{name}.spec" for name in BUILTIN_TASKS)

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
