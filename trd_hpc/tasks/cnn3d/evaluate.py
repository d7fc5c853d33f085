"""Evaluation of a dual-path 3-D CNN run (paper 001): response and severity metrics on the
test split, figures, and the report's summary and sections."""

from __future__ import annotations

import numpy as np

from trd_hpc.console import step
from trd_hpc.tasks.cnn3d.config import CNN3DExperiment

# Paper 001's test figures, shown beside ours in the report's summary.
PAPER = {"accuracy": 1.00, "severity_mae": 8.03}
PAPER_LABEL = "paper 001"
EXAMPLES_PER_CLASS = 4

# What the report says each figure shows (keys: the figure names of evaluate_cnn3d).
CAPTIONS = {
    "Training progression": "Train and validation accuracy, severity MAE and loss per epoch.",
    "Confusion matrix (test)": "Counts and share of the true class; colour: that share.",
    "Predicted vs true severity (test)": "One point per test subject, coloured by true class; shaded: each class's "
    "severity range (cohort.severity_ranges), dotted: its bounds.",
    "Severity error histogram (test)": "Predicted minus true severity on the original scale.",
    "Example volumes (test)": "Middle axial slice of a few test volumes per class, as the model sees them, "
    "on one grey scale.",
}
# an ingested cohort has no generated severity ranges
INGESTED_CAPTIONS = {
    **CAPTIONS,
    "Predicted vs true severity (test)": "One point per test subject, coloured by true class.",
    "Example volumes (test)": "Middle axial slice of a few test volumes per class (participant ids in the titles), "
    "as the model sees them, on one grey scale.",
}


def _scored_on(cfg) -> dict:
    from trd_hpc.tasks import spec_for

    return {name: b.scored_on for name, b in spec_for(cfg).baselines.items()}


def _examples(cfg: CNN3DExperiment, per_class: int = EXAMPLES_PER_CLASS) -> dict:
    """``{class name: [(title, volume), ...]}``: the first few test volumes of each class."""
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.data.trace import subject_labels

    ds = CohortDataset(cfg.data.cohort, cfg.data.split("test"))
    names = list(cfg.cohort.class_names)
    scale = float(cfg.cohort.severity_max)
    picked: dict = {n: [] for n in names}
    for i in range(len(ds)):
        if all(len(v) >= per_class for v in picked.values()):
            break
        item = ds[i]
        k = int(item["response"])
        if 0 <= k < len(names) and len(picked[names[k]]) < per_class:
            sev = float(item["severity"]) * scale
            picked[names[k]].append((int(item["subject_id"]), sev, item["volume"].float().numpy()[0]))  # [X, Y, Z]
    ds.close()
    who = subject_labels(cfg.data.cohort, [sid for v in picked.values() for sid, _, _ in v])
    # participant ids where the cohort has them (ingested), else the subject number
    return {n: [(f"{who[sid]}, severity {sev:.0f}", vol) for sid, sev, vol in v] for n, v in picked.items()}


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
        with step("figures"):
            d = run.figures_dir
            d.mkdir(exist_ok=True)
            scale = cfg.cohort.severity_max
            figs = {
                "Training progression": F.training_progression(history, d / "progression.png"),
                "Confusion matrix (test)": F.confusion_matrix_plot(mc["confusion_matrix"], names, d / "confusion.png"),
                "Predicted vs true severity (test)": F.severity_scatter(
                    test["severity"] * scale,
                    test["severity_pred"] * scale,
                    d / "severity_scatter.png",
                    classes=test["response"],
                    class_names=names,
                    # an ingested cohort has no generated ranges
                    ranges=getattr(cfg.cohort, "severity_ranges", None),
                ),
                "Severity error histogram (test)": F.error_histogram(
                    test["severity"] * scale, test["severity_pred"] * scale, d / "severity_errors.png"
                ),
                "Example volumes (test)": F.example_volumes(_examples(cfg), d / "examples.png"),
            }
    return m, figs


# --------------------------------------------------------------------------- report
def summary_statistics(n_classes: int):
    """The rows of the summary table, each a function of (true class, predicted class, true
    severity, predicted severity) of one model, severities on the original scale."""
    from trd_hpc.eval.metrics import fast_macro_f1
    from trd_hpc.eval.report import Statistic

    def pearson(r, rp, s, sp) -> float:
        return float(np.corrcoef(s, sp)[0, 1]) if s.std() > 0 and sp.std() > 0 else float("nan")

    return (
        Statistic("accuracy", "response accuracy", lambda r, rp, s, sp: float(np.mean(r == rp))),
        Statistic(
            "macro_f1", "response macro F1", lambda r, rp, s, sp: fast_macro_f1(r, rp, n_classes), needs="accuracy"
        ),
        Statistic("severity_mae", "severity MAE", lambda r, rp, s, sp: float(np.mean(np.abs(sp - s))), 2, "low"),
        Statistic(
            "severity_rmse",
            "severity RMSE",
            lambda r, rp, s, sp: float(np.sqrt(np.mean((sp - s) ** 2))),
            2,
            "low",
            needs="severity_mae",
        ),
        Statistic("severity_pearson_r", "severity Pearson r", pearson, needs="severity_mae"),
    )


def _arrays(cfg: CNN3DExperiment, pred: dict) -> tuple:
    scale = float(cfg.cohort.severity_max)  # both stored on the [0, 1] scale the loss saw
    return (
        np.asarray(pred["response"]),
        np.asarray(pred["response_logits"]).argmax(1),
        np.asarray(pred["severity"], dtype=np.float64) * scale,
        np.asarray(pred["severity_pred"], dtype=np.float64) * scale,
    )


def _summary_columns(cfg: CNN3DExperiment, run, metrics: dict) -> tuple[list, list[str]]:
    from trd_hpc.eval.report import Column, baseline_columns

    # the run's own targets: a single-task model's metrics.json holds only its own
    own = tuple(k for k in ("accuracy", "severity_mae") if f"test.{k}" in metrics)
    cols = [Column(f"{cfg.model.name.replace('_', ' ')} (this run)", _arrays(cfg, run.predictions("test")), own)]
    more, notes = baseline_columns(cfg, run, lambda pred: _arrays(cfg, pred), _scored_on(cfg))
    return cols + more, notes


def report_parts(cfg: CNN3DExperiment, run, metrics: dict):
    """The CNN report: the summary (accuracy, macro F1, severity MAE / RMSE / r of the model
    and its baselines, 95 % CIs, paper 001), response (confusion and per-class tables),
    severity, training and example volumes."""
    from trd_hpc.data.kinds import kind_of
    from trd_hpc.eval.report import ReportParts, Section, confusion_table, per_class_table, summary_table

    names = list(cfg.cohort.class_names)
    cols, notes = _summary_columns(cfg, run, metrics)
    paper = PAPER if kind_of(cfg.cohort).generated else None  # the paper beside its own synthetic cohorts only
    summary = summary_table(summary_statistics(len(names)), cols, paper, PAPER_LABEL)
    r, rp = cols[0].arrays[:2]
    tables = []
    if "accuracy" in cols[0].scored_on:
        cm = metrics.get("test.confusion_matrix")
        if cm is None:
            from sklearn.metrics import confusion_matrix

            cm = confusion_matrix(r, rp, labels=list(range(len(names))))
        tables = [confusion_table(cm, names), per_class_table(r, rp, names, "Per class (test).")]
    sections = [
        Section("Response", tables, ["Confusion matrix (test)"], tables_at="beside"),
        Section("Severity", figures=["Predicted vs true severity (test)", "Severity error histogram (test)"]),
        Section("Training", figures=["Training progression"]),
        Section("Data", figures=["Example volumes (test)"]),
    ]
    return ReportParts(summary, sections, CAPTIONS if paper is not None else INGESTED_CAPTIONS, notes)
