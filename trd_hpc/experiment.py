"""The experiment layer: what every entry point (CLI, SLURM scripts, submitit jobs, Ray Tune
trials, cross-validation) calls.  Typed arguments, no argparse.

    train_run(cfg, run_dir)       one training run: its cohort (trd_hpc.cohort), then the
                                  steps of trd_hpc.train.session.TrainingSession
    train(cfg, run_dir)           `trd-hpc train`: train_run, then its evaluation step
                                  (baselines + the evaluation stage) on rank 0
    derive_config(cfg, updates)   a config made from another, validated again whole
    train_baselines(cfg, run_dir) each baseline of the config, trained once, reused after
    evaluate(run_dir)             `trd-hpc evaluate`: (eval.* overrides), baselines, evaluation
    fold_config(cfg, k)           the config of cross-validation fold k

Evaluation reads what training wrote and trains nothing; the baselines it compares with
are trained here first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trd_hpc import faults
from trd_hpc.cohort import ensure_cohort, resolve_cohort
from trd_hpc.config import ConfigError, derive, merge_overrides, to_dict, validate_experiment
from trd_hpc.console import labelled, say, step
from trd_hpc.locks import DirLock
from trd_hpc.rundir import RunDir
from trd_hpc.tasks import spec_for
from trd_hpc.train.session import TrainingSession, default_label

if TYPE_CHECKING:
    from trd_hpc.config import ExperimentConfig

__all__ = ["derive_config", "evaluate", "fold_config", "train", "train_baselines", "train_run"]


def derive_config(cfg: "ExperimentConfig", updates: Mapping[str, Any], source: str = "derived config"):
    """``cfg`` with the dotted ``updates`` set, through dict -> set -> validate (see config.derive)."""
    return derive(cfg, dict(updates), source)


def check_baselines(cfg) -> None:
    """Every name in eval.baselines is a baseline of the config's task (checked before training)."""
    spec = spec_for(cfg)
    unknown = [n for n in cfg.eval.baselines if n not in spec.baselines]
    if unknown:
        raise ConfigError(
            f"eval.baselines: {', '.join(unknown)} not a baseline of task {cfg.task}; "
            f"its baselines: {', '.join(spec.baselines) or 'none'}"
        )


def baseline_config(cfg: "ExperimentConfig", run_dir: Path, name: str):
    """The config of trainer baseline ``name``: the run's config with the baseline's keys,
    one process (it runs on rank 0 after a DDP job), tracked in the run's W&B group."""
    b = spec_for(cfg).baselines[name]
    return derive_config(
        cfg,
        {
            **dict(b.overrides or {}),
            "train.strategy": "single",
            "train.deepspeed_config": None,
            "tracking.job_type": "baseline",
            "tracking.group": cfg.tracking.group or Path(run_dir).name,
        },
        f"baseline {name} of {Path(run_dir) / 'config.yaml'}",
    )


def train_baselines(cfg: "ExperimentConfig", run_dir: str | Path, progress: bool = False) -> dict[str, dict] | None:
    """Train each baseline of ``cfg.eval.baselines`` into ``RUN_DIR/baselines/NAME`` (reused
    when it already holds metrics and test predictions); their final metrics by name, or
    None when a pre-emption stopped one (it resumes on the next call)."""
    check_baselines(cfg)
    spec, run = spec_for(cfg), RunDir(run_dir)
    out: dict[str, dict] = {}
    for name in cfg.eval.baselines:
        target = run.baseline(name)
        if target.finished_training():
            out[name] = target.metrics()
            continue
        b = spec.baselines[name]
        if b.fit is not None:
            with labelled(f"baseline {name}"), step("fit"):
                out[name] = b.fit(cfg, target.path)
            continue
        # standalone: after a DDP run this is rank 0 alone, with the launcher's variables still set
        m = train_run(
            baseline_config(cfg, run.path, name),
            target.path,
            resume="auto",
            progress=progress,
            standalone=True,
            label=f"baseline {name}",
        )
        if m is None:
            return None
        out[name] = m
    return out


def _evaluation_stage(run_dir: Path, figures: bool = True) -> dict | None:
    from trd_hpc.evaluation import evaluate_run

    run = RunDir(run_dir)
    faults.point("evaluate")
    if train_baselines(run.config(), run.path) is None:
        say("pre-empted while training a baseline; rerun with --resume auto to continue")
        return None
    with labelled("eval"):
        return evaluate_run(run.path, figures=figures)


def train_run(
    cfg,
    run_dir: str | Path,
    resume: str | None = None,
    progress: bool = True,
    on_step=None,
    on_epoch=None,
    standalone: bool = False,
    evaluate: bool = False,
    label: str | None = None,
) -> dict | None:
    """One training run; returns the final metrics on rank 0 (None elsewhere or when pre-empted).

    The steps, in every process of the job: the cohort (an ingested one's own description,
    a synthetic one generated only when asked), the run directory, training, the final
    predictions; with ``evaluate``, then the evaluation step (the baselines and the
    evaluation stage) on rank 0 while the other ranks wait.  Its console lines start with
    ``[label]`` (default: the task, e.g. ``[emt]``).

    ``on_step(trainer)`` runs after every optimiser step and ``on_epoch(trainer, row)``
    after each epoch's checkpoint is written (Ray Tune reports there).  ``standalone``:
    one process whatever the launcher says (baselines trained by rank 0 of a DDP job)."""
    with labelled(label or default_label(cfg)):
        cfg = resolve_cohort(cfg)
        with TrainingSession(cfg, run_dir, standalone=standalone) as session:
            root = ensure_cohort(cfg, session.info, progress)
            session.start(root, resume, progress=progress)
            metrics = session.fit(on_step=on_step, on_epoch=on_epoch)
            if evaluate and not session.preempted:
                metrics = session.on_main(_evaluation_stage)
            return metrics


def train(
    cfg,
    run_dir: str | Path,
    resume: str | None = None,
    evaluate: bool = True,
    progress: bool = True,
    on_step=None,
    on_epoch=None,
) -> dict | None:
    """`trd-hpc train`: train, then (rank 0, the other ranks waiting) the baselines and the
    evaluation stage.  The final metrics on rank 0; None elsewhere or when pre-empted."""
    if evaluate:
        check_baselines(cfg)
    return train_run(
        cfg, run_dir, resume=resume, progress=progress, on_step=on_step, on_epoch=on_epoch, evaluate=evaluate
    )


def eval_override_config(run_dir: Path, overrides):
    """The run's config with ``eval`` keys changed (e.g. more baselines), not yet written.

    Only ``eval.*`` keys: the rest describes how the model was trained and stays as it was."""
    overrides = list(overrides or ())
    if not overrides:
        return None
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("eval.")]
    if bad:
        raise ConfigError(
            f"evaluate takes only eval.* overrides (the model was trained with {run_dir / 'config.yaml'}): "
            f"{', '.join(bad)}"
        )
    cfg_path = run_dir / "config.yaml"
    data = merge_overrides(to_dict(RunDir(run_dir).config()), overrides, str(cfg_path))
    return validate_experiment(data, str(cfg_path))


def evaluate(run_dir: str | Path, figures: bool = True, overrides=()) -> dict | None:
    """`trd-hpc evaluate RUN_DIR [eval.KEY=VALUE ...]`: the evaluation stage again.

    ``eval.*`` overrides are written into the run's config.yaml first (once every input has
    been read and checked); a baseline whose directory already holds test predictions is
    reused, a new one trained."""
    from trd_hpc.evaluation import check_inputs

    run = RunDir(run_dir)
    if not run.path.is_dir():
        from trd_hpc.errors import RunDirError

        raise RunDirError(f"{run.path}: no such run directory")
    with DirLock(run.path, "run directory"):
        new_cfg = eval_override_config(run.path, overrides)
        check_inputs(run)
        if new_cfg is not None:
            check_baselines(new_cfg)
            run.write_config(new_cfg)  # replaced whole: a bad override leaves it as it was
        return _evaluation_stage(run.path, figures)


def fold_config(cfg: "ExperimentConfig", k: int):
    """Cross-validation fold ``k``: test = fold k, train/val from the others; baselines are
    compared on the main split, not per fold."""
    return derive_config(
        cfg,
        {
            "data.fold": k,
            "tracking.group": cfg.tracking.group or "cv",
            "tracking.job_type": "cv-fold",
            "eval.baselines": [],
        },
        f"cross-validation fold {k}",
    )
