"""Evaluation of an EMT run (paper 000): test metrics, post-hoc calibration, feature
importance by modality, the baselines' curves beside the model's, figures."""

from __future__ import annotations

import numpy as np
import torch

from trd_hpc.console import step
from trd_hpc.tasks.emt.config import EMTExperiment

# Paper 000's test figures, shown beside ours in the report's summary (its accuracy is the
# uncalibrated one at P >= 0.5: perfectly ranked scores all on one side of 0.5).
PAPER = {"auc": 1.00, "ap": 1.00, "accuracy": 0.50}
PAPER_LABEL = "paper 000"

# What the report says each figure shows (keys: the figure names of evaluate_emt).
CAPTIONS = {
    "ROC (test)": "Test ROC of the model and each baseline; the dashed diagonal is chance.",
    "Precision-recall (test)": "Test precision-recall; the dotted line is the TRD prevalence.",
    "Reliability diagram": "Observed TRD fraction per bin of predicted P(TRD), one line per calibrator "
    "(each fitted on the validation split); below, the test subjects per bin.",
    "Predicted probability by class": "Test subjects per bin of P(TRD), by true class, one panel per calibrator; "
    "dashed: the 0.5 decision threshold.",
    "Confidence by class": "P(TRD) by true class for each calibrator: violins, medians and every subject as a point.",
    "Loss and validation AUC": "Per epoch; the dotted line marks the best validation AUC (the weights kept).",
    "Feature importance by modality": "Gradient x input on test subjects by fMRI region and clinical variable, "
    "and the SNP attention weights; each panel on its own scale.",
    "fMRI slices with regions": "Time-mean axial slices of one TRD and one non-TRD test subject through each region "
    "(red: the column's region), all on one grey scale.",
    "SNP genotype frequencies by class": "Training subjects' genotype frequencies, predictive SNPs vs the others.",
}
# An ingested cohort has no generated effects: no regions with a signal, no predictive SNPs.
INGESTED_CAPTIONS = {
    **CAPTIONS,
    "Feature importance by modality": "Gradient x input on test subjects by octant of the grid (no atlas: octants, "
    "not brain regions) and clinical variable, and the SNP attention weights; each panel on its own scale.",
    "fMRI slices": "Time-mean axial slices at four depths of one TRD and one non-TRD test subject (participant ids "
    "in the row titles), all on one grey scale.",
    "SNP genotype frequencies by class": "Training subjects' genotype frequencies by class over all selected SNPs.",
}


def _scored_on(cfg) -> dict:
    from trd_hpc.tasks import spec_for

    return {name: b.scored_on for name, b in spec_for(cfg).baselines.items()}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_probabilities(rec: dict) -> np.ndarray:
    """P(TRD) of a predictions file: the model's logits or a baseline's probabilities."""
    return np.asarray(rec["prob"], dtype=np.float64) if "prob" in rec else _sigmoid(rec["logit"])


def _slices_figure(cfg, examples, d) -> dict:
    """Slices of an example subject per class (voxel fMRI; none for region x time series)."""
    from trd_hpc.data.kinds import kind_of
    from trd_hpc.eval import figures as F

    if cfg.cohort.fmri_regions is not None:
        return {}
    if kind_of(cfg.cohort).generated:
        return {
            "fMRI slices with regions": F.fmri_slices_with_regions(
                examples, cfg.cohort.region_boxes, d / "fmri_slices.png"
            )
        }
    return {"fMRI slices": F.fmri_slices_with_regions(examples, {}, d / "fmri_slices.png")}


def importance(cfg: EMTExperiment, model) -> dict:
    """Gradient x input (Captum) on the first ``eval.importance_subjects`` test subjects, by region and
    clinical variable, plus the SNP attention's share on the predictive SNPs."""
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.eval import importance as imp

    ds = CohortDataset(cfg.data.cohort, cfg.data.split("test"))
    n = min(len(ds), cfg.eval.importance_subjects)
    b = ds.__getitems__(list(range(n)))
    inputs = {"fmri": b["fmri"].float(), "clinical": b["clinical"].float()}
    for k in ("snp", "present"):  # no snp: a cohort without genotypes
        if k in b:
            inputs[k] = b[k]
    attr = imp.grad_x_input(model, inputs, ["fmri", "clinical"])
    out = {
        "fmri_regions": (
            imp.aggregate_fmri_by_named_region(attr["fmri"].numpy(), cfg.cohort.fmri_regions)
            if cfg.cohort.fmri_regions is not None
            else imp.aggregate_fmri_by_region(attr["fmri"].numpy(), cfg.cohort.region_boxes)
        ),
        "clinical": imp.aggregate_clinical(attr["clinical"].numpy(), cfg.cohort.clinical_names),
    }
    if "snp" in inputs and hasattr(model, "snp_attention"):
        with torch.no_grad():
            w = model.snp_attention(inputs["snp"])
        out["snp"] = imp.snp_importance(w.numpy(), cfg.cohort.n_predictive_snps)
    ds.close()
    return out


def _examples(cfg: EMTExperiment):
    """One TRD and one non-TRD test subject (fMRI; keyed "TRD (sub-01)": its participant id
    where the cohort has one) and the training SNPs with labels."""
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.data.trace import subject_labels

    ds = CohortDataset(cfg.data.cohort, cfg.data.split("test"))
    labels = ds.__getitems__(list(range(len(ds))))["label"].numpy() if len(ds) <= 512 else None
    picked = []
    for cls, name in ((1, "TRD"), (0, "non-TRD")):
        hits = np.flatnonzero(labels == cls) if labels is not None else [cls]
        if len(hits):
            item = ds[int(hits[0])]
            picked.append((name, int(item["subject_id"]), item["fmri"].float().numpy()))
    ds.close()
    who = subject_labels(cfg.data.cohort, [sid for _, sid, _ in picked])
    examples = {f"{name} ({who[sid]})": vol for name, sid, vol in picked}
    tr = CohortDataset(cfg.data.cohort, cfg.data.split("train"), complete=cfg.data.complete("train"))
    k = min(len(tr), 400)
    b = tr.__getitems__(list(range(k)))
    snp = b["snp"].numpy().copy() if "snp" in b else None  # None: a cohort without genotypes
    y = b["label"].numpy().copy()
    tr.close()
    return examples, snp, y


# --------------------------------------------------------------------------- report
def _accuracy(y, p) -> float:
    return float(np.mean((p >= 0.5) == (y == 1)))


def _f1(y, p) -> float:
    tp, pos, pred = float(np.sum((p >= 0.5) & (y == 1))), float(np.sum(y == 1)), float(np.sum(p >= 0.5))
    return 2 * tp / (pos + pred) if pos + pred else 0.0


def summary_statistics(n_bins: int):
    """The rows of the summary table, each a function of (labels, P(TRD)) of one model.
    AUC and AP without sklearn's checks (metrics.rank_auc): the bootstrap calls them 1000 times."""
    from trd_hpc.eval.metrics import expected_calibration_error, fast_average_precision, rank_auc
    from trd_hpc.eval.report import Statistic

    nan = float("nan")
    return (
        Statistic("auc", "ROC AUC", lambda y, p: rank_auc(y, p) if 0 < y.sum() < y.size else nan),
        Statistic("ap", "average precision", lambda y, p: fast_average_precision(y, p) if y.any() else nan),
        Statistic("accuracy", "accuracy (P \u2265 0.5, uncalibrated)", _accuracy),
        Statistic("f1", "F1 (P \u2265 0.5)", _f1),
        # a baseline scored on AUC gives probabilities: its Brier score and ECE mean something
        Statistic("brier", "Brier score", lambda y, p: float(np.mean((p - y) ** 2)), better="low", needs="auc"),
        Statistic(
            "ece",
            f"ECE ({n_bins} bins)",
            lambda y, p: expected_calibration_error(y, p, n_bins),
            better="low",
            needs="auc",
        ),
    )


def _summary_columns(cfg: EMTExperiment, run) -> tuple[list, list[str]]:
    """(label, P(TRD)) of the model and each baseline whose test predictions are there."""
    from trd_hpc.eval.report import Column, baseline_columns

    def arrays(pred) -> tuple:
        return np.asarray(pred["label"]), test_probabilities(pred)

    name = "EMT" if cfg.model.name == "emt" else cfg.model.name
    cols = [Column(f"{name} (this run)", arrays(run.predictions("test")))]
    more, notes = baseline_columns(cfg, run, arrays, _scored_on(cfg))
    return cols + more, notes


_CALIBRATION_COLUMNS = ("accuracy", "ece", "brier", "auc")
_CALIBRATION_PARAMS = {"platt": ("a", "b"), "temperature": ("T",), "isotonic": ("n_steps",)}


def _calibration_row(method: str, metrics: dict, best: bool) -> list:
    from trd_hpc.eval.calibration import METHOD_LABELS
    from trd_hpc.eval.report import DASH, Cell

    pre = f"calibrated.{method}."
    name = Cell(METHOD_LABELS.get(method, method))
    if f"{pre}error" in metrics:  # could not be fitted (e.g. one class in validation): say why
        return [name, *(Cell(DASH) for _ in _CALIBRATION_COLUMNS), Cell(str(metrics[f"{pre}error"]), num=False)]
    values = [Cell(f"{metrics[pre + k]:.3f}", best=best and k == "ece") for k in _CALIBRATION_COLUMNS]
    params = ", ".join(
        f"{k} = {metrics[pre + k]:.4g}" for k in _CALIBRATION_PARAMS.get(method, ()) if pre + k in metrics
    )
    if f"{pre}degenerate" in metrics:  # fitted, but not probabilities to ship: never the bundle's default
        params = f"{params}; DEGENERATE, not used as the default: {metrics[pre + 'degenerate']}".lstrip("; ")
    return [name, *values, Cell(params, num=False)]


def calibration_table(cfg: EMTExperiment, metrics: dict):
    """One row per method (uncalibrated first): test accuracy, ECE (the lowest in bold),
    Brier, AUC and the fitted parameters; None when metrics.json has no calibration."""
    from trd_hpc.eval.report import Table

    methods = [
        m
        for m in ("uncalibrated", *cfg.eval.calibration)
        if {f"calibrated.{m}.ece", f"calibrated.{m}.error"} & set(metrics)
    ]
    if not methods:
        return None
    fitted = [m for m in methods if f"calibrated.{m}.ece" in metrics and f"calibrated.{m}.degenerate" not in metrics]
    best = min(fitted, key=lambda m: metrics[f"calibrated.{m}.ece"], default=None)
    caption = (
        f"Calibrators fitted on the validation split, scored on the test split (accuracy at P \u2265 0.5, "
        f"ECE over {cfg.eval.ece_bins} bins). Platt and temperature keep the ranking, so AUC; isotonic may tie scores."
    )
    rows = [_calibration_row(m, metrics, m == best) for m in methods]
    return Table(caption, ["method", "accuracy", "ECE", "Brier", "AUC", "parameters"], rows, kind="calibration")


def report_parts(cfg: EMTExperiment, run, metrics: dict):
    """The EMT report: the summary (AUC, AP, accuracy, F1, Brier, ECE of the model and its
    baselines, 95 % CIs, paper 000), discrimination, calibration, training, importance, data."""
    from trd_hpc.data.kinds import kind_of
    from trd_hpc.eval.report import ReportParts, Section, per_class_table, summary_table

    synthetic = kind_of(cfg.cohort).generated
    cols, notes = _summary_columns(cfg, run)
    # the paper's figures belong beside its own synthetic cohorts only, never beside real data
    summary = summary_table(summary_statistics(cfg.eval.ece_bins), cols, PAPER if synthetic else None, PAPER_LABEL)
    y, p = cols[0].arrays
    per_class = per_class_table(
        y, (p >= 0.5).astype(int), ["non-TRD", "TRD"], "Per class at P(TRD) \u2265 0.5, before calibration (test)."
    )
    cal = calibration_table(cfg, metrics)
    sections = [
        Section("Discrimination", [per_class], ["ROC (test)", "Precision-recall (test)"]),
        Section(
            "Calibration",
            [cal] if cal else [],
            ["Reliability diagram", "Predicted probability by class", "Confidence by class"],
            tables_at="beside",
        ),
        Section("Training", figures=["Loss and validation AUC"]),
        Section("Feature importance", figures=["Feature importance by modality"]),
        Section(
            "Data",
            text="" if cfg.cohort.n_snps else f"Genotypes {NO_GENOTYPES}.",
            figures=["fMRI slices with regions" if synthetic else "fMRI slices", "SNP genotype frequencies by class"],
        ),
    ]
    return ReportParts(summary, sections, CAPTIONS if synthetic else INGESTED_CAPTIONS, notes)


def _importance_figure(cfg: EMTExperiment, imp: dict, path):
    from trd_hpc.eval import figures as F

    panels = {"fMRI regions": imp["fmri_regions"], "clinical": imp["clinical"]}
    units = {
        "fMRI regions": "mean |gradient \u00d7 input| per voxel",
        "clinical": "mean |gradient \u00d7 input|",
        "SNPs": "mean attention weight",
    }
    refs, highlight = {}, {}
    if "snp" in imp:
        snps = {k: v for k, v in imp["snp"].items() if k.startswith("snp_")}
        panels["SNPs"] = snps
        refs["SNPs"] = (1.0 / max(1, len(snps)), "uniform attention")
        k = cfg.cohort.n_predictive_snps
        highlight["SNPs"] = ([f"snp_{j:04d}" for j in range(k)], "predictive SNP (generated effect)")
    return F.feature_importance_plot(panels, path, units=units, references=refs, highlight=highlight)


NO_GENOTYPES = "absent: the cohort has no genotypes; the model has no SNP branch"
MIN_PATTERN_SUBJECTS = 10  # fewer, or one class only: the AUC of that pattern is not reported


def pattern_name(code: int) -> str:
    """The modalities of a ``present`` code (fMRI 4, genotypes 2, clinical 1), e.g. ``fmri+clinical``."""
    parts = [n for n, bit in (("fmri", 4), ("genotypes", 2), ("clinical", 1)) if int(code) & bit]
    return "+".join(parts) or "none"


def by_modality_pattern(test: dict, prob) -> dict:
    """Test AUC and subject count per available-modality pattern (a cohort ingested with
    on_missing: keep); a pattern with too few subjects or one class says so (``.too_few``)."""
    from trd_hpc.eval.metrics import rank_auc

    if "present" not in test:
        return {}
    out: dict = {}
    codes, y, p = np.asarray(test["present"]), np.asarray(test["label"]), np.asarray(prob)
    for code in np.unique(codes):
        sel = codes == code
        key = f"test.by_modality.{pattern_name(code)}"
        ys = y[sel]
        ok = sel.sum() >= MIN_PATTERN_SUBJECTS and 0 < ys.sum() < len(ys)
        out[f"{key}.n"] = int(sel.sum())
        out[f"{key}.auc"] = float(rank_auc(ys, p[sel])) if ok else float("nan")
        if not ok:
            out[f"{key}.too_few"] = 1
    return out


def evaluate_emt(cfg: EMTExperiment, run, model, history: list, preds: dict, figures: bool) -> tuple[dict, dict]:
    from trd_hpc.eval import figures as F
    from trd_hpc.eval.calibration import METHOD_LABELS, calibrate_all
    from trd_hpc.eval.metrics import binary_metrics, curves

    val, test = preds["val"], preds["test"]
    prob = _sigmoid(test["logit"])
    m = {f"test.{k}": v for k, v in binary_metrics(test["label"], prob, n_bins=cfg.eval.ece_bins).items()}
    m.update(by_modality_pattern(test, prob))
    if not cfg.cohort.n_snps:
        m["genotypes"] = NO_GENOTYPES
    run.write_json("curves.json", curves(test["label"], prob), indent=None)
    with step(f"calibration ({', '.join(cfg.eval.calibration)})"):
        cal, probs = calibrate_all(
            val["logit"],
            val["label"],
            test["logit"],
            test["label"],
            cfg.eval.calibration,
            cfg.eval.ece_bins,
            return_probs=True,
        )
    for method, res in cal.items():
        for k, v in res.items():
            m[f"calibrated.{method}.{k}"] = v
    with step("feature importance"):
        imp = importance(cfg, model)  # the run's model, weights loaded by the caller
    run.write_json("importance.json", imp)
    for k, v in imp["fmri_regions"].items():
        m[f"importance.fmri.{k}"] = v
    for k, v in imp["clinical"].items():
        m[f"importance.clinical.{k}"] = v
    if "snp" in imp:
        m["importance.snp.predictive_share"] = imp["snp"]["predictive_share"]
    figs = {}
    if figures:
        with step("figures"):
            overlay = {"EMT" if cfg.model.name == "emt" else cfg.model.name: (test["label"], prob)}
            for name in cfg.eval.baselines:
                b = run.baseline(name).predictions("test")
                overlay[name.replace("_", " ")] = (b["label"], test_probabilities(b))
            d = run.figures_dir
            d.mkdir(exist_ok=True)
            examples, snp, ysnp = _examples(cfg)
            # every calibrator that fitted, named, in the config's order (uncalibrated first)
            by_method = {METHOD_LABELS.get(k, k): v for k, v in probs.items()}
            figs = {
                "Loss and validation AUC": F.loss_and_auc_curves(history, d / "loss_auc.png"),
                "ROC (test)": F.roc_curve_plot(overlay, None, d / "roc.png"),
                "Precision-recall (test)": F.pr_curve_plot(overlay, None, d / "pr.png"),
                "Reliability diagram": F.reliability_diagram(
                    test["label"],
                    by_method,
                    d / "reliability.png",
                    n_bins=cfg.eval.ece_bins,
                    flagged={METHOD_LABELS.get(k, k) for k, r in cal.items() if "degenerate" in r},
                ),
                "Predicted probability by class": F.probability_densities(
                    test["label"], by_method, d / "densities.png"
                ),
                "Feature importance by modality": _importance_figure(cfg, imp, d / "importance.png"),
                **_slices_figure(cfg, examples, d),
                **(
                    {
                        "SNP genotype frequencies by class": F.snp_allele_histograms(
                            snp, ysnp, cfg.cohort.n_predictive_snps, d / "snp_hist.png"
                        )
                    }
                    if snp is not None
                    else {}
                ),
                "Confidence by class": F.confidence_violins(test["label"], by_method, d / "violins.png"),
            }
    return m, figs
