"""Evaluation: metrics, post-hoc calibration, attributions, figures, HTML report.

Submodules are imported lazily by callers (``from trd_hpc.eval.figures import
...``) so that metrics-only users do not pay for matplotlib or torch.
"""

from trd_hpc.config import flatten
from trd_hpc.eval.calibration import (
    IsotonicCalibrator,
    PlattCalibrator,
    TemperatureCalibrator,
    calibrate_all,
    make_calibrator,
)
from trd_hpc.eval.metrics import (
    binary_metrics,
    bootstrap_ci,
    curves,
    expected_calibration_error,
    multiclass_metrics,
    regression_metrics,
    reliability_bins,
)
from trd_hpc.eval.report import write_report

__all__ = [
    "IsotonicCalibrator",
    "PlattCalibrator",
    "TemperatureCalibrator",
    "calibrate_all",
    "make_calibrator",
    "binary_metrics",
    "bootstrap_ci",
    "curves",
    "expected_calibration_error",
    "multiclass_metrics",
    "regression_metrics",
    "reliability_bins",
    "flatten",
    "write_report",
]
