"""What every tracking backend gives the trainer: the ``Logger`` protocol.

A logger receives a run's epoch rows, its final metrics and its figures, and is finished
once; ``read_back`` gives what it recorded back to ``trd-hpc compare``.  None may stop a training run: a backend that fails says so once on stderr and goes
quiet (``say_once``).  ``trd_hpc.tracking.Tracker`` hands each call to every logger the
config turns on (W&B, CSV, MLflow).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

_said: set[str] = set()


@runtime_checkable
class Logger(Protocol):
    name: str  # "wandb", "csv", "mlflow"

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One metrics.jsonl row; ``row["epoch"]`` is the step."""

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """The run's final metrics (flat dotted keys)."""

    def log_figures(self, figures: Mapping[str, Path | str], step: int | None = None) -> None:
        """PNG files by title."""

    def finish(self, exit_code: int | None = None) -> None: ...

    @staticmethod
    def read_back(run_dir: Path) -> dict | None:
        """What this backend holds of the run in ``run_dir``, without a server:
        ``{"history": [epoch rows], "summary": {key: value}}``, or None when it holds nothing
        (``trd-hpc compare`` of a run whose metrics.jsonl did not come along)."""


def say_once(msg: str, who: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(f"{who}: {msg}", file=sys.stderr, flush=True)


def finite_metrics(metrics: Mapping[str, Any]) -> dict:
    """Numbers only, None and NaN left out (what a summary or a metric store takes)."""
    import math

    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
    }
