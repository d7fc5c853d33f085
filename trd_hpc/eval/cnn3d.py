"""Evaluation of a dual-path 3-D CNN run (paper 001): response and severity metrics on the
test split, figures."""

from __future__ import annotations

from trd_hpc.config import CNN3DExperiment
from trd_hpc.console import say


def evaluate_cnn3d(cfg: CNN3DExperiment, run, history: list, preds: dict, figures: bool) -> tuple[dict, dict]:
    from trd_hpc.eval import figures as F
    from trd_hpc.eval.metrics import multiclass_metrics, regression_metrics

    test = preds["test"]
    names = list(cfg.cohort.class_names)
    mc = multiclass_metrics(test["response"], test["response_logits"], names)
    rg = regression_metrics(test["severity"], test["severity_pred"], cfg.cohort.severity_max)
    m = {f"test.{k}": v for k, v in {**mc, **rg}.items() if k != "class_names"}
    figs = {}
    if figures:
        say("figures ...")
        d = run.figures_dir
        d.mkdir(exist_ok=True)
        scale = cfg.cohort.severity_max
        figs = {
            "Training progression": F.training_progression(history, d / "progression.png"),
            "Confusion matrix (test)": F.confusion_matrix_plot(mc["confusion_matrix"], names, d / "confusion.png"),
            "Predicted vs true severity (test)": F.severity_scatter(
                test["severity"] * scale, test["severity_pred"] * scale, d / "severity_scatter.png"
            ),
            "Severity error histogram (test)": F.error_histogram(
                test["severity"] * scale, test["severity_pred"] * scale, d / "severity_errors.png"
            ),
        }
    return m, figs
