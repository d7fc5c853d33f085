"""Paper 000: the EMT predicts treatment-resistant depression (a binary label) from fMRI,
SNPs and clinical variables; baselines: a late-fusion MLP and a random forest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trd_hpc.tasks.base import Baseline, TaskSpec, check_finite, param_flops_estimate
from trd_hpc.tasks.emt.config import EMTExperiment


class EMTTask:
    name = "emt"
    input_names = ("fmri", "snp", "clinical")

    def __init__(self, cfg: EMTExperiment, cohort_root: str = ""):
        self.cfg = cfg
        self.root = cohort_root
        if not cfg.cohort.n_snps:  # a cohort without genotypes: the model takes none (WithoutGenotypes)
            self.input_names = ("fmri", "clinical")
        if getattr(cfg.cohort, "modality_mask", False):  # subjects may lack a modality
            self.input_names = (*self.input_names, "present")

    def build_model(self) -> nn.Module:
        from trd_hpc.tasks.emt.baselines import build_emt_model

        return build_emt_model(self.cfg)

    def flops_per_sample(self, model: nn.Module) -> int:
        if self.cfg.model.name == "emt":
            from trd_hpc.tasks.emt.model import emt_flops_per_sample

            c = self.cfg.cohort
            return int(emt_flops_per_sample(self.cfg.model, c.fmri_shape, c.n_snps, len(c.clinical_names)))
        return param_flops_estimate(model)

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        fmri = batch["fmri"].to(device, non_blocking=True).to(dtype)
        clinical = batch["clinical"].to(device, non_blocking=True).to(dtype)
        check_finite("fmri", fmri, batch, self.root)
        check_finite("clinical", clinical, batch, self.root)
        out = {"fmri": fmri, "clinical": clinical}
        if "snp" in self.input_names:
            out["snp"] = batch["snp"].to(device, non_blocking=True)
        if "present" in batch:
            out["present"] = batch["present"].to(device, non_blocking=True)
        return out

    def loss(self, out: torch.Tensor, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        y = batch["label"].to(device).float()
        return F.binary_cross_entropy_with_logits(out.float(), y), {}

    def records(self, out: torch.Tensor, batch: dict) -> dict[str, np.ndarray]:
        rec = {
            "subject_id": batch["subject_id"].numpy(),
            "is_pad": batch["is_pad"].numpy(),
            "logit": out.detach().float().cpu().numpy(),
            "label": batch["label"].numpy(),
        }
        if "present" in batch:  # which modalities each subject had (metrics per pattern)
            rec["present"] = batch["present"].numpy().astype(np.int64) @ np.array([4, 2, 1])
        return rec

    def metrics(self, rec: dict[str, np.ndarray]) -> dict[str, float]:
        from trd_hpc.eval.metrics import binary_metrics

        logit = torch.from_numpy(rec["logit"]).double()
        y = torch.from_numpy(rec["label"]).double()
        prob = torch.sigmoid(logit).numpy()
        m = {"loss": float(F.binary_cross_entropy_with_logits(logit, y))}
        bm = binary_metrics(rec["label"], prob)
        m.update({k: float(bm[k]) for k in ("accuracy", "f1", "auc", "ap") if k in bm})
        return m


def fit_random_forest(cfg: EMTExperiment, out_dir: Path) -> dict:
    """scikit-learn's random forest on per-subject summary features (regional fMRI means,
    SNP dosages, clinical values); writes a run-like directory: metrics.json, the test
    predictions and the forest's top features."""
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.eval.metrics import binary_metrics
    from trd_hpc.rundir import RunDir
    from trd_hpc.tasks.emt.baselines import emt_summary_features
    from trd_hpc.tasks.emt.baselines import fit_random_forest as fit

    def features(split: str):
        ds = CohortDataset(cfg.data.cohort, cfg.data.split(split), complete=cfg.data.complete(split))
        xs, ys, ids = [], [], []
        for lo in range(0, len(ds), 32):
            b = ds.__getitems__(list(range(lo, min(lo + 32, len(ds)))))
            x, names = emt_summary_features({k: b[k] for k in ("fmri", "snp", "clinical") if k in b}, cfg.cohort)
            xs.append(np.asarray(x))
            ys.append(b["label"].numpy())
            ids.append(b["subject_id"].numpy())
            del b
        ds.close()
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids), names

    xtr, ytr, _, names = features("train")
    xte, yte, ids, _ = features("test")
    rf = fit(xtr, ytr, cfg.eval.rf_estimators, cfg.train.seed)
    prob = rf.predict_proba(xte)[:, 1]
    run = RunDir(out_dir)
    top = sorted(zip(names, rf.feature_importances_), key=lambda t: -t[1])[:10]
    run.write_json("top_features.json", [[n, float(v)] for n, v in top])
    run.write_predictions("test", {"subject_id": ids, "label": yte, "prob": prob})
    return run.write_metrics({f"test.{k}": v for k, v in binary_metrics(yte, prob).items()})


def evaluate(cfg, run, model, history, preds, figures):
    from trd_hpc.tasks.emt.evaluate import evaluate_emt

    return evaluate_emt(cfg, run, model, history, preds, figures)


def report(cfg, run, metrics):
    from trd_hpc.tasks.emt.evaluate import report_parts

    return report_parts(cfg, run, metrics)


def prediction_columns(bundle, out, batch) -> dict:
    """P(TRD) before and after the bundle's default calibrator, the label at 0.5 and, for a
    labelled cohort, the true label."""
    from trd_hpc.eval.calibration import apply_calibrator

    logit = out.detach().double().cpu().numpy()
    raw = 1.0 / (1.0 + np.exp(-logit))
    cal = apply_calibrator(bundle.default_calibrator(), logit)
    cols = {"p_trd_raw": raw, "p_trd_calibrated": cal, "predicted_label": (cal >= 0.5).astype(np.int64)}
    y = batch["label"].numpy()
    if (y >= 0).all():
        cols["label"] = y
    return cols


def explain(bundle, model, inputs: dict) -> list[tuple[dict, dict]]:
    """Integrated Gradients per modality (explain.py beside this file): the fMRI map and the top regions,
    SNPs and clinical variables of each subject."""
    from trd_hpc.explain import region_scores, top_scores
    from trd_hpc.tasks.emt.explain import emt_attributions

    co = bundle.cfg.cohort
    a = emt_attributions(model, inputs["fmri"], inputs.get("snp"), inputs["clinical"], present=inputs.get("present"))
    snp_names = list(bundle.schema.get("snp_ids") or []) or [f"snp_{j:04d}" for j in range(co.n_snps)]
    out = []
    named = co.fmri_regions
    for i in range(a["fmri"].shape[0]):
        if named is not None:  # region x time fMRI: IG per region already
            regions = dict(zip(named, (float(v) for v in np.abs(a["fmri"][i]))))
        else:
            regions = region_scores(a["fmri"][i], co.region_boxes)
        summary = {
            "top_regions": top_scores(list(regions), np.array(list(regions.values()))),
            "top_snps": top_scores(snp_names, a["snp"][i]),
            "top_clinical": top_scores(list(co.clinical_names), a["clinical"][i]),
            "ig_fmri_total": float(a["fmri"][i].sum()),
            "ig_snp_total": float(a["snp"][i].sum()),
            "ig_clinical_total": float(a["clinical"][i].sum()),
        }
        out.append(({"fmri_ig": a["fmri"][i]} if named is None else {}, summary))
    return out


def bootstrap_statistics(cfg, test: dict) -> tuple[dict, tuple]:
    """AUC, accuracy at 0.5 and ECE of the uncalibrated probabilities."""
    from trd_hpc.eval.metrics import expected_calibration_error, rank_auc

    p = 1 / (1 + np.exp(-np.asarray(test["logit"], dtype=np.float64)))
    # the metrics themselves, not binary_metrics: sklearn's input checks made 1000 draws 8.7 s
    stats = {
        "auc": lambda y, p: rank_auc(y, p) if 0 < y.sum() < y.size else float("nan"),
        "accuracy": lambda y, p: float(((p >= 0.5) == (y == 1)).mean()),
        "ece": lambda y, p: expected_calibration_error(y, p, cfg.eval.ece_bins),
    }
    return stats, (np.asarray(test["label"]), p)


def cohort_mismatch(bundle, co) -> list[str]:
    """The cohort's clinical columns and SNP ids against the model's (same order)."""
    out = []
    names = list(getattr(co, "clinical_names", []))
    if names != bundle.schema["clinical_names"]:
        out.append(f"clinical columns {names} differ from the model's {bundle.schema['clinical_names']}")
    ids, want = list(getattr(co, "snp_ids", None) or []), bundle.schema.get("snp_ids") or []
    if want and ids != want:
        diff = next((i for i, (x, y) in enumerate(zip(ids, want)) if x != y), min(len(ids), len(want)))
        out.append(
            f"SNP ids differ from the model's from position {diff} "
            f"({ids[diff] if diff < len(ids) else 'none'} vs {want[diff] if diff < len(want) else 'none'})"
        )
    regions, want_regions = getattr(co, "fmri_regions", None), getattr(bundle.cfg.cohort, "fmri_regions", None)
    if regions != want_regions:
        out.append(f"fMRI regions {regions} differ from the model's {want_regions}")
    if getattr(co, "genotype_values", 3) > bundle.schema["genotype_values"]:
        out.append("genotypes have missing calls (coded 3); the model was trained on 0/1/2 only")
    return out


_SCORED = ("auc", "ap", "accuracy", "f1")


def reproduce(out: Path, scale: str):
    from trd_hpc.tasks.emt.reproduce import recipe

    return recipe(out, scale)


SPEC = TaskSpec(
    name="emt",
    config_class=EMTExperiment,
    make_task=EMTTask,
    title="EMT: treatment-resistant depression",
    baselines={
        "late_fusion_mlp": Baseline(overrides={"model.name": "late_fusion_mlp"}, scored_on=_SCORED),
        "random_forest": Baseline(fit=fit_random_forest, scored_on=_SCORED),
    },
    evaluate=evaluate,
    report=report,
    summary_keys=("test.auc", "test.ap", "test.accuracy", "best_epoch"),
    curves=("val.loss", "val.auc"),
    cv_keys=("test.auc", "test.accuracy", "best_epoch", "epochs_run"),
    prediction_columns=prediction_columns,
    explain=explain,
    bootstrap_statistics=bootstrap_statistics,
    cohort_mismatch=cohort_mismatch,
    paper="paper000",
    reproduce=reproduce,
)
