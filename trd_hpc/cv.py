"""``trd-hpc cv``: k-fold cross-validation with the shared trainer.

Fold k trains on the other folds (minus a stratified validation part for early
stopping and the LR plateau) and is tested on fold k; folds are stratified and
disjoint by subject and come from the cohort's manifest.  Folds run one after
another here, or one per SLURM array task (``--fold K``); the summary (mean and
sd of every metric over the folds) is written when all folds are done.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trd_hpc.config import ConfigError
from trd_hpc.errors import RunDirError
from trd_hpc.fsio import atomic_write_json
from trd_hpc.rundir import RunDir

SUMMARY = "cv_summary.json"


def check_folds(cfg, folds: int | None) -> int:
    have = getattr(cfg.cohort.split, "folds", None)
    if have is None:
        raise ConfigError(f"task {cfg.task}: its cohort has no cross-validation folds")
    if folds is not None and folds != have:
        raise ConfigError(
            f"--folds {folds} but the cohort config has cohort.split.folds={have}; "
            f"pass cohort.split.folds={folds} (and a data.cohort made with it)"
        )
    return have


def fold_dir(out: Path, k: int) -> Path:
    return Path(out) / f"fold-{k}"


def run_fold(cfg, out: Path, k: int, progress: bool = True) -> dict | None:
    """Train and evaluate fold ``k``; a fold already trained and evaluated with this same config is
    kept as it is (a rerun of the CV only trains what is missing); one finished with another config goes to
    the trainer, whose resume check names the keys that differ."""
    from trd_hpc.config import to_dict
    from trd_hpc.experiment import fold_config, train

    fcfg, run_dir = fold_config(cfg, k), RunDir(fold_dir(out, k))
    evaluated = run_dir.finished_training() and (run_dir / "report.html").is_file()  # written after metrics
    if evaluated and to_dict(run_dir.config()) == to_dict(fcfg):
        if progress:
            print(f"fold {k}: finished before, kept", flush=True)
        return run_dir.metrics()
    return train(fcfg, run_dir.path, resume="auto", progress=progress)


def aggregate(out: Path, folds: int) -> dict:
    """Mean and sd (ddof 1) of every numeric metric over the folds."""
    out = Path(out)
    rows = []
    missing = []
    for k in range(folds):
        run = RunDir(fold_dir(out, k))
        if run.has_metrics():
            rows.append(run.metrics())
        else:
            missing.append(k)
    if missing:
        raise RunDirError(f"{out}: folds {missing} have no metrics.json yet")
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    summary: dict = {"folds": folds}
    for key in keys:
        vals = np.array([r.get(key, math.nan) for r in rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        if len(vals) == 0:
            continue
        summary[f"mean.{key}"] = float(vals.mean())
        summary[f"sd.{key}"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        summary[f"min.{key}"] = float(vals.min())
        summary[f"max.{key}"] = float(vals.max())
        summary[f"per_fold.{key}"] = [float(v) for v in vals]
    atomic_write_json(out / SUMMARY, summary)
    return summary


def format_summary(
    summary: dict, keys=("test.auc", "test.accuracy", "test.severity_mae", "test.macro_f1", "best_epoch", "epochs_run")
) -> str:
    lines = [f"{summary['folds']}-fold cross-validation (mean +- sd; min..max)"]
    for k in keys:
        if f"mean.{k}" in summary:
            lines.append(
                f"  {k:<20} {summary[f'mean.{k}']:.4f} +- {summary[f'sd.{k}']:.4f}  "
                f"({summary[f'min.{k}']:.4f}..{summary[f'max.{k}']:.4f})"
            )
    return "\n".join(lines)


def run_cv(
    cfg,
    out: Path,
    folds: int | None = None,
    fold: int | None = None,
    only_aggregate: bool = False,
    progress: bool = True,
) -> dict | None:
    from trd_hpc.cohort import resolve_cohort

    cfg = resolve_cohort(cfg)
    k_total = check_folds(cfg, folds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not only_aggregate:
        todo = [fold] if fold is not None else list(range(k_total))
        for k in todo:
            if not 0 <= k < k_total:
                raise ConfigError(f"--fold {k} is outside 0..{k_total - 1}")
            if progress:
                print(f"fold {k + 1}/{k_total} -> {fold_dir(out, k)}", flush=True)
            if run_fold(cfg, out, k, progress) is None and not RunDir(fold_dir(out, k)).has_metrics():
                print(f"fold {k} was pre-empted; rerun the same command to continue", flush=True)
                return None
    done = [k for k in range(k_total) if RunDir(fold_dir(out, k)).has_metrics()]
    if len(done) < k_total:
        if only_aggregate:
            raise RunDirError(f"{out}: folds {sorted(set(range(k_total)) - set(done))} are not finished")
        return None
    return aggregate(out, k_total)
