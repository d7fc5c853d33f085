"""Evaluation of an EMT run (paper 000): test metrics, post-hoc calibration, feature
importance by modality, the baselines' curves beside the model's, figures."""

from __future__ import annotations

import numpy as np
import torch

from trd_hpc.config import EMTExperiment
from trd_hpc.console import say, step


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_probabilities(rec: dict) -> np.ndarray:
    """P(TRD) of a predictions file: the model's logits or a baseline's probabilities."""
    return np.asarray(rec["prob"], dtype=np.float64) if "prob" in rec else _sigmoid(rec["logit"])


def importance(cfg: EMTExperiment, model) -> dict:
    """Gradient x input (Captum) on the first ``eval.importance_subjects`` test subjects, by region and
    clinical variable, plus the SNP attention's share on the predictive SNPs."""
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.eval import importance as imp

    ds = CohortDataset(cfg.data.cohort, cfg.data.split("test"))
    n = min(len(ds), cfg.eval.importance_subjects)
    b = ds.__getitems__(list(range(n)))
    inputs = {"fmri": b["fmri"].float(), "snp": b["snp"], "clinical": b["clinical"].float()}
    attr = imp.grad_x_input(model, inputs, ["fmri", "clinical"])
    out = {
        "fmri_regions": imp.aggregate_fmri_by_region(attr["fmri"].numpy(), cfg.cohort.region_boxes),
        "clinical": imp.aggregate_clinical(attr["clinical"].numpy(), cfg.cohort.clinical_names),
    }
    if hasattr(model, "snp_attention"):
        with torch.no_grad():
            w = model.snp_attention(inputs["snp"])
        out["snp"] = imp.snp_importance(w.numpy(), cfg.cohort.n_predictive_snps)
    ds.close()
    return out


def _examples(cfg: EMTExperiment):
    """One TRD and one non-TRD test subject (fMRI) and the training SNPs with labels."""
    from trd_hpc.data.dataset import CohortDataset

    ds = CohortDataset(cfg.data.cohort, cfg.data.split("test"))
    labels = ds.__getitems__(list(range(len(ds))))["label"].numpy() if len(ds) <= 512 else None
    examples = {}
    for cls, name in ((1, "TRD"), (0, "non-TRD")):
        pos = int(np.flatnonzero(labels == cls)[0]) if labels is not None else cls
        examples[name] = ds[pos]["fmri"].float().numpy()
    ds.close()
    tr = CohortDataset(cfg.data.cohort, cfg.data.split("train"))
    k = min(len(tr), 400)
    b = tr.__getitems__(list(range(k)))
    snp, y = b["snp"].numpy().copy(), b["label"].numpy().copy()
    tr.close()
    return examples, snp, y


def evaluate_emt(cfg: EMTExperiment, run, model, history: list, preds: dict, figures: bool) -> tuple[dict, dict]:
    from trd_hpc.eval import figures as F
    from trd_hpc.eval.calibration import calibrate_all
    from trd_hpc.eval.metrics import binary_metrics, curves

    val, test = preds["val"], preds["test"]
    prob = _sigmoid(test["logit"])
    m = {f"test.{k}": v for k, v in binary_metrics(test["label"], prob, n_bins=cfg.eval.ece_bins).items()}
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
        say("figures ...")
        overlay = {"EMT" if cfg.model.name == "emt" else cfg.model.name: (test["label"], prob)}
        for name in cfg.eval.baselines:
            b = run.baseline(name).predictions("test")
            overlay[name.replace("_", " ")] = (b["label"], test_probabilities(b))
        d = run.figures_dir
        d.mkdir(exist_ok=True)
        examples, snp, ysnp = _examples(cfg)
        best = "platt" if "platt" in probs else next((k for k in probs if k != "uncalibrated"), None)
        figs = {
            "Loss and validation AUC": F.loss_and_auc_curves(history, d / "loss_auc.png"),
            "ROC (test)": F.roc_curve_plot(overlay, None, d / "roc.png"),
            "Precision-recall (test)": F.pr_curve_plot(overlay, None, d / "pr.png"),
            "Predicted probability by class": F.probability_densities(
                test["label"], prob, d / "densities.png", prob_calibrated=probs.get(best)
            ),
            "Feature importance by modality": F.feature_importance_plot(
                {
                    "fMRI regions": imp["fmri_regions"],
                    "clinical": imp["clinical"],
                    **({"SNPs": {k: v for k, v in imp["snp"].items() if k.startswith("snp_")}} if "snp" in imp else {}),
                },
                d / "importance.png",
            ),
            "fMRI slices with regions": F.fmri_slices_with_regions(
                examples, cfg.cohort.region_boxes, d / "fmri_slices.png"
            ),
            "SNP genotype frequencies by class": F.snp_allele_histograms(
                snp, ysnp, cfg.cohort.n_predictive_snps, d / "snp_hist.png"
            ),
            "Confidence by class": F.confidence_violins(
                test["label"], prob, d / "violins.png", prob_calibrated=probs.get(best)
            ),
        }
    return m, figs
