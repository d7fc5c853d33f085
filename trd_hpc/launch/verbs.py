"""The verbs a launcher can run, as one table: for each, the ``trd-hpc`` command line a job of
it executes.  The Kubernetes writer puts these lines into its manifests, ``submit`` prints the
one its submitit job stands for, and the CLI defines the same verbs with the same flags
(``trd_hpc.cli``), so a job runs exactly what a user would type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from trd_hpc.errors import ConfigError


@runtime_checkable
class Launcher(Protocol):
    """Runs a ``trd_hpc.launch.submit.SubmitRequest`` somewhere: submitit (SLURM, local, this
    process) or a Kubernetes manifest; ``trd_hpc.launch.submit.launcher_for`` picks one by
    ``--cluster``.  Returns ``trd-hpc submit``'s exit code."""

    name: str

    def submit(self, request) -> int: ...


@dataclass(frozen=True)
class JobVerb:
    name: str
    # (config, out, overrides, options) -> the arguments after `trd-hpc`
    argv: Callable[[str, str, list[str], dict], list[str]]
    distributed: bool  # may span several processes (DDP through torchrun / srun)
    checkpointed: bool  # resumes after a kill or pre-emption (rerun the same command)


def _train(config, out, overrides, o):
    return [
        "train",
        config,
        "--out",
        out,
        "--resume",
        "auto",
        "--quiet",
        *(["--no-eval"] if o.get("no_eval") else []),
        *overrides,
    ]


def _cv(config, out, overrides, o):
    fold = o.get("fold")
    return [
        "cv",
        config,
        "--out",
        out,
        *(["--folds", str(o["folds"])] if o.get("folds") else []),
        *(["--fold", str(fold)] if fold is not None else []),
        "--quiet",
        *overrides,
    ]


def _generate(config, out, overrides, o):
    return ["generate", config, "--out", out, "--workers", str(o.get("workers") or 1), "--quiet", *overrides]


def _tune(config, out, overrides, o):
    return ["tune", config, "--out", out, "--quiet", *overrides]


def _predict(config, out, overrides, o):
    return ["predict", config, "--cohort", o["cohort"], "--split", o.get("split", "test"), "--out", out, "--quiet"]


VERBS: dict[str, JobVerb] = {
    v.name: v
    for v in (
        JobVerb("train", _train, distributed=True, checkpointed=True),
        JobVerb("cv", _cv, distributed=True, checkpointed=True),
        JobVerb("generate", _generate, distributed=False, checkpointed=True),
        JobVerb("tune", _tune, distributed=False, checkpointed=True),
        JobVerb("predict", _predict, distributed=True, checkpointed=False),
    )
}


def job_argv(
    verb: str, config: str, out: str, overrides: list[str] | None = None, options: dict | None = None
) -> list[str]:
    """``trd-hpc`` arguments of a job of ``verb`` (ConfigError for an unknown verb)."""
    v = VERBS.get(verb)
    if v is None:
        raise ConfigError(f"unknown verb {verb!r}; one of {', '.join(VERBS)}")
    return v.argv(config, out, list(overrides or []), dict(options or {}))


def overrides_with_defaults(a) -> list[str]:
    """A request's overrides plus what its resources imply for train and cv (several tasks:
    DDP; threads = CPUs per task; trd_hpc.train.plan), as every launcher passes them."""
    if a.verb not in ("train", "cv"):
        return list(a.overrides or [])
    from trd_hpc.config import load_config
    from trd_hpc.train.plan import implied_overrides

    configured = load_config(a.config, a.overrides).train.strategy
    return implied_overrides(a.overrides, a.nodes * a.tasks_per_node, a.cpus_per_task, configured)


@dataclass
class PlannedJob:
    """One job of a request, checked: the verb's config (as given), output, overrides (with
    what the resources imply), options, and the validated config (train, cv, generate)."""

    verb: str
    config: str
    out: str
    overrides: list[str]
    options: dict
    cfg_data: dict | None = None


def plan_jobs(a) -> list[PlannedJob]:
    """The jobs of a SubmitRequest, every launcher's: one, or one per fold for cv.  Errors now
    (a bad key, an unknown fold, a verb that runs one task), not in the queue."""
    import time
    from pathlib import Path

    stem = Path(a.config).stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    world = a.nodes * a.tasks_per_node
    if world > 1 and not VERBS[a.verb].distributed:
        raise ConfigError(f"submit {a.verb} runs one task (use --cpus-per-task), not {world}")
    if a.verb == "predict":
        if not a.cohort:
            raise ConfigError(f"submit predict needs --cohort DIR (the subjects to predict); got {a.cohort!r}")
        out = a.out or f"runs/predict-{stem}-{stamp}.csv"
        return [PlannedJob("predict", a.config, out, [], {"cohort": a.cohort, "split": a.split})]
    if a.verb == "tune":
        from trd_hpc import resources

        if not resources.sweep_path(a.config).exists():
            raise ConfigError(f"sweep spec {a.config} not found")
        return [PlannedJob("tune", a.config, a.out or f"runs/tune-{stem}-{stamp}", list(a.overrides or []), {})]
    from trd_hpc.config import load_config, to_dict

    overrides = overrides_with_defaults(a)
    cfg = load_config(a.config, overrides)
    data = to_dict(cfg)
    if a.verb == "generate":
        opts = {"workers": a.cpus_per_task}
        return [PlannedJob("generate", a.config, a.out or cfg.data.cohort, overrides, opts, data)]
    out = a.out or f"runs/{a.verb}-{stem}-{stamp}"
    if a.verb == "train":
        return [PlannedJob("train", a.config, out, overrides, {"no_eval": a.no_eval}, data)]
    from trd_hpc.cv import check_folds

    k = check_folds(cfg, a.folds)
    folds = [a.fold] if a.fold is not None else list(range(k))
    if any(not 0 <= f < k for f in folds):
        raise ConfigError(f"--fold {a.fold} is outside 0..{k - 1}")
    return [PlannedJob("cv", a.config, out, overrides, {"folds": k, "fold": f}, data) for f in folds]
