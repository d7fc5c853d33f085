"""``Tracker``: one call of the trainer reaches every logger the config turns on.

W&B (``tracking.wandb``, offline by default), ``RUN_DIR/metrics.csv`` (``tracking.csv``) and
MLflow (``tracking.mlflow``) implement ``trd_hpc.tracking.base.Logger``; only rank 0 logs.
A backend of your own is one more class with those four methods and a line in ``start``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from trd_hpc.tracking.base import Logger
from trd_hpc.tracking.csv_logger import CsvHistory, CsvLogger
from trd_hpc.tracking.wandb_logger import WandbLogger


class Tracker:
    def __init__(self, wandb: WandbLogger, loggers: list[Logger] | None = None):
        self.wandb = wandb
        self.loggers: list[Logger] = [wandb, *(loggers or [])]

    @classmethod
    def noop(cls, reason: str | None = None) -> "Tracker":
        return cls(WandbLogger.noop(reason))

    @classmethod
    def start(
        cls,
        cfg,
        run_dir: Path,
        rank: int = 0,
        job_type: str | None = None,
        group: str | None = None,
        name: str | None = None,
        cohort: dict | None = None,
    ) -> "Tracker":
        """Every logger ``cfg.tracking`` turns on, for ``run_dir`` (rank 0; other ranks log nothing).
        ``cohort``: the cohort's identity (data.manifest.cohort_identity), recorded beside the
        config so a run in a dashboard names its data."""
        if rank != 0:
            return cls.noop(f"rank {rank}")
        run_dir = Path(run_dir)
        extra: list[Logger] = []
        if cfg.tracking.csv:
            extra.append(CsvLogger(run_dir))
        if cfg.tracking.mlflow:
            from trd_hpc.tracking.mlflow_logger import MlflowLogger

            ml = MlflowLogger.start(cfg, run_dir, job_type, group, name, cohort)
            if ml is not None:
                extra.append(ml)
        return cls(WandbLogger.start(cfg, run_dir, rank, job_type, group, name, cohort), extra)

    # the W&B run's state, as the commands report it
    @property
    def enabled(self) -> bool:
        return self.wandb.enabled

    @property
    def reason(self) -> str | None:
        return self.wandb.reason

    @property
    def id(self) -> str | None:
        return self.wandb.id

    @property
    def record(self) -> dict:
        return self.wandb.record

    @property
    def csv(self) -> CsvHistory | None:
        return next((lg.history for lg in self.loggers if isinstance(lg, CsvLogger)), None)

    def logger(self, name: str) -> Logger | None:
        return next((lg for lg in self.loggers if lg.name == name), None)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_epoch(row)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_summary(metrics)

    def log_figures(self, figures: Mapping[str, Path | str], step: int | None = None) -> None:
        for lg in self.loggers:
            lg.log_figures(figures, step)

    def finish(self, exit_code: int | None = None) -> None:
        for lg in self.loggers:
            lg.finish(exit_code)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


def figures_of(run_dir: Path) -> dict[str, Path]:
    """title -> PNG from ``RUN_DIR/figures/index.json`` (written by the evaluation)."""
    index = Path(run_dir) / "figures" / "index.json"
    if not index.is_file():
        return {}
    return {k: index.parent / v for k, v in json.loads(index.read_text()).items()}


def read_back(run_dir: Path) -> tuple[str, dict] | None:
    """(backend, ``{"history", "summary"}``) of the first backend that recorded the run in
    ``run_dir`` (W&B, MLflow, then metrics.csv: the fullest record first), or None."""
    from trd_hpc.tracking.mlflow_logger import MlflowLogger

    for cls in (WandbLogger, MlflowLogger, CsvLogger):
        rec = cls.read_back(Path(run_dir))
        if rec is not None:
            return cls.name, rec
    return None
