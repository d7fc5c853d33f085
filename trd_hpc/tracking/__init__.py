"""Experiment tracking: W&B (offline by default), metrics.csv and MLflow behind one
``Logger`` protocol (``base``), fanned out by ``Tracker`` (``tracker``); what a backend recorded, read back
(``read_back``) for ``trd-hpc compare``."""

from trd_hpc.tracking.base import Logger, _said
from trd_hpc.tracking.csv_logger import CSV_HISTORY, CsvHistory, CsvLogger, csv_cell
from trd_hpc.tracking.tracker import Tracker, figures_of, read_back
from trd_hpc.tracking.wandb_logger import RUN_RECORD, WandbLogger, read_offline_run, read_run_record, wandb_run_dirs

__all__ = [
    "CSV_HISTORY",
    "RUN_RECORD",
    "CsvHistory",
    "CsvLogger",
    "Logger",
    "Tracker",
    "WandbLogger",
    "_said",
    "csv_cell",
    "figures_of",
    "read_back",
    "read_offline_run",
    "read_run_record",
    "wandb_run_dirs",
]
