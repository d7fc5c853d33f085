"""``trd-hpc evaluate RUN_DIR``: everything after training, from the run directory alone.

Reads config.yaml, metrics.jsonl, predictions/{val,test}.npz and model.pt;
adds the full test metrics, calibration (EMT), feature importance (EMT),
the baselines (trained by the same trainer, or scikit-learn's random forest),
the figures, and report.html.  ``metrics.json`` keeps flat dotted keys
(``test.auc``, ``calibrated.platt.accuracy``, ``baselines.random_forest.auc``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from trd_hpc import faults
from trd_hpc.config import CNN3DExperiment, EMTExperiment, to_yaml, validate_experiment
from trd_hpc.errors import RunDirError
from trd_hpc.fsio import atomic_write_json, atomic_write_text
from trd_hpc.locks import DirLock


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: unreadable {what} ({type(e).__name__}); the file is truncated or damaged") from None


def load_run(run_dir: Path):
    from trd_hpc.train.run import read_run_config

    cfg = read_run_config(run_dir)
    metrics = _read_json(run_dir / "metrics.json", "metrics") if (run_dir / "metrics.json").exists() else {}
    history = []
    if (run_dir / "metrics.jsonl").exists():
        history = [_loads_row(run_dir / "metrics.jsonl", i, line)
                   for i, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines(), 1) if line.strip()]
    preds = {}
    for split in ("val", "test"):
        p = run_dir / "predictions" / f"{split}.npz"
        if not p.exists():
            raise RunDirError(f"{p} is missing: the run has not finished training (resume it with --resume auto)")
        try:
            with np.load(p) as z:
                preds[split] = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError: truncated or not an npz
            raise RunDirError(f"{p}: unreadable predictions ({type(e).__name__}); the file is truncated or damaged. "
                              f"Remove it and model.pt, then `trd-hpc train ... --resume auto` writes them again") from None
    return cfg, metrics, history, preds


def _loads_row(path: Path, lineno: int, line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        raise RunDirError(f"{path}: line {lineno} is not JSON; the file is truncated or damaged") from None


def load_model(cfg, run_dir: Path) -> torch.nn.Module:
    from trd_hpc.train.tasks import make_task

    path = run_dir / "model.pt"
    model = make_task(cfg).build_model()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: the run has not finished training (resume it with --resume auto)") from None
    except Exception as e:  # truncated zip, garbage, pickle of non-tensors
        raise RunDirError(f"{path}: unreadable weights ({type(e).__name__}); the file is truncated or damaged") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise RunDirError(f"{path}: weights do not fit the model of {run_dir / 'config.yaml'}: "
                          f"{str(e).splitlines()[0]}") from None
    return model.eval()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _finite(d: dict) -> dict:
    """JSON-safe: NaN -> None."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


# ---------------------------------------------------------------------------- baselines
def train_baseline(cfg, run_dir: Path, name: str) -> dict:
    """Train baseline ``name`` with the shared trainer (one process) and return its final metrics."""
    from trd_hpc.train.run import train

    out = run_dir / "baselines" / name
    if (out / "metrics.json").exists() and (out / "predictions" / "test.npz").exists():
        return json.loads((out / "metrics.json").read_text())
    bcfg = cfg.model_copy(deep=True)
    bcfg.model.name = name
    bcfg.train.strategy = "single"
    bcfg.train.deepspeed_config = None
    bcfg.tracking.job_type = "baseline"
    bcfg.tracking.group = cfg.tracking.group or run_dir.name
    # standalone: after a DDP run this is rank 0 alone, with the launcher's variables still set
    return train(bcfg, out, resume="auto", evaluate_after=False, progress=False, standalone=True)


def random_forest_baseline(cfg: EMTExperiment, run_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.eval.metrics import binary_metrics
    from trd_hpc.models.baselines import emt_summary_features, fit_random_forest

    def features(split: str):
        ds = CohortDataset(cfg.data.cohort, cfg.data.split(split))
        xs, ys = [], []
        for lo in range(0, len(ds), 32):
            b = ds.__getitems__(list(range(lo, min(lo + 32, len(ds)))))
            x, names = emt_summary_features({k: b[k] for k in ("fmri", "snp", "clinical")}, cfg.cohort)
            xs.append(np.asarray(x))
            ys.append(b["label"].numpy())
            del b
        ds.close()
        return np.concatenate(xs), np.concatenate(ys), names

    xtr, ytr, names = features("train")
    xte, yte, _ = features("test")
    rf = fit_random_forest(xtr, ytr, cfg.eval.rf_estimators, cfg.train.seed)
    prob = rf.predict_proba(xte)[:, 1]
    m = binary_metrics(yte, prob)
    top = sorted(zip(names, rf.feature_importances_), key=lambda t: -t[1])[:10]
    atomic_write_json(run_dir / "baselines" / "random_forest.json",
                      {"metrics": _finite(m), "top_features": [[n, float(v)] for n, v in top]})
    return m, yte, prob


# ---------------------------------------------------------------------------- EMT
def _emt_importance(cfg: EMTExperiment, run_dir: Path, model) -> dict:
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.eval import importance as imp

    ds = CohortDataset(cfg.data.cohort, cfg.data.split("test"))
    n = min(len(ds), cfg.eval.importance_subjects)
    b = ds.__getitems__(list(range(n)))
    inputs = {"fmri": b["fmri"].float(), "snp": b["snp"], "clinical": b["clinical"].float()}
    attr = imp.grad_x_input(model, inputs, ["fmri", "clinical"])
    out = {
        "fmri_regions": imp.aggregate_fmri_by_region(attr["fmri"].numpy(), {k: r.box for k, r in cfg.cohort.regions.items()}),
        "clinical": imp.aggregate_clinical(attr["clinical"].numpy(), cfg.cohort.clinical.names),
    }
    if hasattr(model, "snp_attention"):
        with torch.no_grad():
            w = model.snp_attention(inputs["snp"])
        out["snp"] = imp.snp_importance(w.numpy(), cfg.cohort.snp.n_predictive)
    ds.close()
    return out


def _emt_examples(cfg: EMTExperiment):
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


def evaluate_emt(cfg: EMTExperiment, run_dir: Path, metrics: dict, history: list, preds: dict, figures: bool) -> tuple[dict, dict]:
    from trd_hpc.eval import figures as F
    from trd_hpc.eval.calibration import calibrate_all
    from trd_hpc.eval.metrics import binary_metrics, curves

    val, test = preds["val"], preds["test"]
    prob = _sigmoid(test["logit"])
    m = {f"test.{k}": v for k, v in binary_metrics(test["label"], prob, n_bins=cfg.eval.ece_bins).items()}
    atomic_write_json(run_dir / "curves.json", curves(test["label"], prob), indent=None)
    cal, probs = calibrate_all(val["logit"], val["label"], test["logit"], test["label"], cfg.eval.calibration,
                               cfg.eval.ece_bins, return_probs=True)
    for method, res in cal.items():
        for k, v in res.items():
            m[f"calibrated.{method}.{k}"] = v
    model = load_model(cfg, run_dir)
    importance = _emt_importance(cfg, run_dir, model)
    atomic_write_json(run_dir / "importance.json", importance)
    for k, v in importance["fmri_regions"].items():
        m[f"importance.fmri.{k}"] = v
    for k, v in importance["clinical"].items():
        m[f"importance.clinical.{k}"] = v
    if "snp" in importance:
        m["importance.snp.predictive_share"] = importance["snp"]["predictive_share"]
    overlay = {"EMT" if cfg.model.name == "emt" else cfg.model.name: (test["label"], prob)}
    for name in cfg.eval.baselines:
        if name == "random_forest":
            bm, yb, pb = random_forest_baseline(cfg, run_dir)
            overlay["random forest"] = (yb, pb)
        else:
            bm = train_baseline(cfg, run_dir, name)
            with np.load(run_dir / "baselines" / name / "predictions" / "test.npz") as z:
                overlay[name.replace("_", " ")] = (z["label"], _sigmoid(z["logit"]))
            bm = {k.removeprefix("test."): v for k, v in bm.items() if k.startswith("test.")}
        for k in ("auc", "ap", "accuracy", "f1"):
            if k in bm:
                m[f"baselines.{name}.{k}"] = bm[k]
    figs = {}
    if figures:
        d = run_dir / "figures"
        d.mkdir(exist_ok=True)
        examples, snp, ysnp = _emt_examples(cfg)
        best = "platt" if "platt" in probs else next((k for k in probs if k != "uncalibrated"), None)
        figs = {
            "Loss and validation AUC": F.loss_and_auc_curves(history, d / "loss_auc.png"),
            "ROC (test)": F.roc_curve_plot(overlay, None, d / "roc.png"),
            "Precision-recall (test)": F.pr_curve_plot(overlay, None, d / "pr.png"),
            "Predicted probability by class": F.probability_densities(
                test["label"], prob, d / "densities.png", prob_calibrated=probs.get(best)),
            "Feature importance by modality": F.feature_importance_plot(
                {"fMRI regions": importance["fmri_regions"], "clinical": importance["clinical"],
                 **({"SNPs": {k: v for k, v in importance["snp"].items() if k.startswith("snp_")}} if "snp" in importance else {})},
                d / "importance.png"),
            "fMRI slices with regions": F.fmri_slices_with_regions(
                examples, {k: r.box for k, r in cfg.cohort.regions.items()}, d / "fmri_slices.png"),
            "SNP genotype frequencies by class": F.snp_allele_histograms(snp, ysnp, cfg.cohort.snp.n_predictive, d / "snp_hist.png"),
            "Confidence by class": F.confidence_violins(test["label"], prob, d / "violins.png", prob_calibrated=probs.get(best)),
        }
    return m, figs


# ---------------------------------------------------------------------------- 3-D CNN
def evaluate_cnn3d(cfg: CNN3DExperiment, run_dir: Path, metrics: dict, history: list, preds: dict, figures: bool) -> tuple[dict, dict]:
    from trd_hpc.eval import figures as F
    from trd_hpc.eval.metrics import multiclass_metrics, regression_metrics

    test = preds["test"]
    names = list(cfg.cohort.class_names)
    mc = multiclass_metrics(test["response"], test["response_logits"], names)
    rg = regression_metrics(test["severity"], test["severity_pred"], cfg.cohort.severity_max)
    m = {f"test.{k}": v for k, v in {**mc, **rg}.items() if k != "class_names"}
    for name in cfg.eval.baselines:
        bm = train_baseline(cfg, run_dir, name)
        # a single-task baseline is scored on its own target only
        own = {"single_task_response": ("accuracy",), "single_task_severity": ("severity_mae",)}.get(
            name, ("accuracy", "severity_mae"))
        for k in own:
            if f"test.{k}" in bm:
                m[f"baselines.{name}.{k}"] = bm[f"test.{k}"]
    figs = {}
    if figures:
        d = run_dir / "figures"
        d.mkdir(exist_ok=True)
        scale = cfg.cohort.severity_max
        figs = {
            "Training progression": F.training_progression(history, d / "progression.png"),
            "Confusion matrix (test)": F.confusion_matrix_plot(mc["confusion_matrix"], names, d / "confusion.png"),
            "Predicted vs true severity (test)": F.severity_scatter(test["severity"] * scale, test["severity_pred"] * scale, d / "severity_scatter.png"),
            "Severity error histogram (test)": F.error_histogram(test["severity"] * scale, test["severity_pred"] * scale, d / "severity_errors.png"),
        }
    return m, figs


# ---------------------------------------------------------------------------- entry points
def eval_override_config(run_dir: Path, overrides):
    """The run's config with ``eval`` keys changed (e.g. more baselines), not yet written.

    Only ``eval.*`` keys: the rest describes how the model was trained and stays as it was."""
    from trd_hpc.config import ConfigError, merge_overrides

    overrides = list(overrides or ())
    if not overrides:
        return None
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("eval.")]
    if bad:
        raise ConfigError(f"evaluate takes only eval.* overrides (the model was trained with {run_dir / 'config.yaml'}): "
                          f"{', '.join(bad)}")
    from trd_hpc.config import to_dict
    from trd_hpc.train.run import read_run_config

    cfg_path = run_dir / "config.yaml"
    data = merge_overrides(to_dict(read_run_config(run_dir)), overrides, str(cfg_path))
    return validate_experiment(data, str(cfg_path))


def run_evaluation(run_dir: Path, figures: bool = True, overrides=()) -> dict:
    """Calibration / importance / baselines / figures / report of a trained run.

    ``overrides``: ``eval.*`` keys changed in the run's config.yaml first.  A baseline whose
    run directory (``RUN_DIR/baselines/NAME``) already holds test predictions is reused,
    not retrained."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    with DirLock(run_dir, "run directory"):  # nests inside train()'s own lock
        faults.point("evaluate")
        new_cfg = eval_override_config(run_dir, overrides)
        cfg, metrics, history, preds = load_run(run_dir)
        load_model(cfg, run_dir)  # every input read and checked before anything is written
        if new_cfg is not None:
            atomic_write_text(run_dir / "config.yaml", to_yaml(new_cfg))  # replaced whole: a bad override leaves it
            cfg = new_cfg
        fn = evaluate_emt if isinstance(cfg, EMTExperiment) else evaluate_cnn3d
        extra, figs = fn(cfg, run_dir, metrics, history, preds, figures)
        metrics.update(extra)
        metrics = _finite(metrics)
        atomic_write_json(run_dir / "metrics.json", metrics, fault="metrics")  # readers never see half a file
        if figs:
            atomic_write_json(run_dir / "figures" / "index.json", {k: str(Path(v).name) for k, v in figs.items()}, indent=None)
        write_run_report(run_dir, metrics=metrics, cfg=cfg)
    return metrics


def write_run_report(run_dir: Path, metrics: dict | None = None, cfg=None) -> Path:
    from trd_hpc.eval.report import write_report

    from trd_hpc.train.run import read_run_config

    faults.point("report")
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = read_run_config(run_dir)
    if metrics is None:
        if not (run_dir / "metrics.json").exists():
            raise RunDirError(f"{run_dir / 'metrics.json'} is missing: the run has not finished training")
        metrics = _read_json(run_dir / "metrics.json", "metrics")
    figs = {}
    index = run_dir / "figures" / "index.json"
    if index.exists():
        figs = {k: run_dir / "figures" / v for k, v in json.loads(index.read_text()).items()}
    title = ("EMT: treatment-resistant depression" if cfg.task == "emt" else "Dual-path 3-D CNN: response and severity")
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list) or len(v) <= 4}
    return write_report(run_dir, f"{title} ({run_dir.name})", shown, figs, to_yaml(cfg))
