"""Evaluation metrics for the EMT (binary) and dual-path CNN (3-class + severity) tasks.

Every function returns plain Python floats, ints and lists so the result can go
straight into JSON.  Undefined values (AUC with one class present, Pearson r of
a constant) are ``nan`` rather than an exception: a tiny or unlucky test split
should still produce a report.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

NAN = float("nan")


def _binary_inputs(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob has {p.size}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must contain only 0 and 1")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ValueError("prob must lie in [0, 1] (pass probabilities, not logits)")
    return y, p


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < y.sum() < y.size


def reliability_bins(y_true, prob, n_bins: int = 10) -> dict:
    """Per-bin statistics of a reliability diagram for P(y = 1).

    Bins are equal-width on [0, 1]: bin k holds ``k/n <= p < (k+1)/n`` and the
    last bin also takes ``p == 1``.  Returns lists ``count``, ``mean_prob`` and
    ``frac_pos`` (``nan`` for empty bins) and the bin ``edges``.
    """
    y, p = _binary_inputs(y_true, prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.floor(p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        frac = np.where(count > 0, sum_y / count, np.nan)
    return {"edges": edges.tolist(), "count": count.tolist(), "mean_prob": mean_p.tolist(), "frac_pos": frac.tolist()}


def expected_calibration_error(y_true, prob, n_bins: int = 10) -> float:
    """ECE of the positive-class probability.

    ``sum_k (n_k / N) * |frac_pos_k - mean_prob_k|`` over ``n_bins`` equal-width
    bins of [0, 1] (see :func:`reliability_bins`), i.e. empty bins count zero and
    every bin is weighted by how many samples fall in it.  This is the binary
    (P(y=1)) variant, not the top-label confidence variant used for multi-class
    models; for a binary task the two differ only in how bins are folded.
    """
    y, p = _binary_inputs(y_true, prob)
    if y.size == 0:
        return NAN
    b = reliability_bins(y, p, n_bins)
    count = np.asarray(b["count"], dtype=np.float64)
    gap = np.abs(np.nan_to_num(np.asarray(b["frac_pos"]) - np.asarray(b["mean_prob"])))
    return float(np.sum(count / count.sum() * gap))


def rank_auc(y, p) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), what ``roc_auc_score`` gives,
    without its input checks: for the bootstrap's thousand resamples. ``y`` holds both classes."""
    from scipy.stats import rankdata

    y = np.asarray(y) == 1
    r = rankdata(p)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_average_precision(y, p) -> float:
    """Average precision as ``average_precision_score`` computes it (tied scores form one
    threshold), without its input checks: those made a thousand bootstrap draws take seconds.
    ``y`` holds at least one positive."""
    y = np.asarray(y) == 1
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="mergesort")
    ps, ys = np.asarray(p, dtype=np.float64)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), ps.size - 1]  # the last subject of each tied score
    tp = np.cumsum(ys)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def fast_macro_f1(y, pred, n_classes: int) -> float:
    """Macro F1 over ``n_classes`` (a class never true nor predicted scores 0, as with
    ``f1_score(..., zero_division=0)``), from one bincount: for the bootstrap's draws."""
    cm = np.bincount(np.asarray(y) * n_classes + np.asarray(pred), minlength=n_classes**2).reshape(n_classes, -1)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2 TP + FP + FN
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


# A percentile bootstrap over fewer subjects than this resamples a handful of values: on 4-10
# subjects it prints intervals such as [1.000, 1.000] that look like certainty and are not.
# Below it no interval is computed, and every table that would show one says why.
MIN_CI_SUBJECTS = 20


def ci_too_small(n: int) -> str | None:
    """Why no bootstrap interval is given for ``n`` subjects, or None when one is."""
    return f"n = {n} < {MIN_CI_SUBJECTS}: too few for a CI" if n < MIN_CI_SUBJECTS else None


def bootstrap_ci(
    stats: Mapping[str, Callable[..., float]],
    *arrays,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_subjects: int = MIN_CI_SUBJECTS,
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of each statistic over subjects resampled with replacement.

    ``arrays`` hold one row per test subject and are resampled together; every statistic
    sees the same draws (a fixed ``seed``: the same intervals each time).  A draw on which
    a statistic is undefined (``nan``, e.g. AUC of a draw holding one class) is left out of
    that statistic's interval; ``None`` when no draw defines it or there are fewer than
    ``min_subjects`` subjects (see MIN_CI_SUBJECTS; callers say so with :func:`ci_too_small`).
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0]) if arrays else 0
    if n < max(2, min_subjects):
        return {k: None for k in stats}
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    values: dict[str, list[float]] = {k: [] for k in stats}
    for idx in draws:
        sample = tuple(a[idx] for a in arrays)
        for k, fn in stats.items():
            values[k].append(fn(*sample))
    tail = 100 * (1 - level) / 2
    out: dict[str, tuple[float, float] | None] = {}
    for k, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if v.size else None
    return out


def binary_metrics(y_true, prob, threshold: float = 0.5, n_bins: int = 10) -> dict:
    """Accuracy and F1 at ``threshold``, ROC AUC, average precision, Brier, ECE.

    ``mean_prob_pos`` / ``mean_prob_neg`` are the mean predicted probability over
    the true positives / negatives: they expose the compressed-but-separated
    score distributions (high AUC, poor 0.5-threshold accuracy) that calibration
    is meant to fix.
    """
    y, p = _binary_inputs(y_true, prob)
    pred = (p >= threshold).astype(np.int64)
    both = _both_classes(y)
    n = int(y.size)
    return {
        "n": n,
        "n_pos": int(y.sum()),
        "accuracy": float(accuracy_score(y, pred)) if n else NAN,
        "f1": float(f1_score(y, pred, zero_division=0)) if n else NAN,
        "auc": float(roc_auc_score(y, p)) if both else NAN,
        "ap": float(average_precision_score(y, p)) if both else NAN,
        "brier": float(brier_score_loss(y, p, pos_label=1)) if n else NAN,
        "ece": expected_calibration_error(y, p, n_bins),
        "mean_prob_pos": float(p[y == 1].mean()) if y.sum() else NAN,
        "mean_prob_neg": float(p[y == 0].mean()) if (y == 0).any() else NAN,
        "threshold": float(threshold),
    }


def _finite_list(a: np.ndarray) -> list:
    # sklearn's first ROC threshold is +inf, which JSON cannot hold.
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, dtype=np.float64)]


def curves(y_true, prob) -> dict:
    """ROC and PR curves as lists (empty when only one class is present).

    Keys: ``roc.fpr``, ``roc.tpr``, ``roc.thresholds`` (first entry ``None`` for
    sklearn's +inf), ``pr.precision``, ``pr.recall``, ``pr.thresholds`` (one
    shorter than precision/recall, as in sklearn).
    """
    y, p = _binary_inputs(y_true, prob)
    if not _both_classes(y):
        return {k: [] for k in ("roc.fpr", "roc.tpr", "roc.thresholds", "pr.precision", "pr.recall", "pr.thresholds")}
    fpr, tpr, roc_t = roc_curve(y, p)
    prec, rec, pr_t = precision_recall_curve(y, p)
    return {
        "roc.fpr": fpr.tolist(),
        "roc.tpr": tpr.tolist(),
        "roc.thresholds": _finite_list(roc_t),
        "pr.precision": prec.tolist(),
        "pr.recall": rec.tolist(),
        "pr.thresholds": _finite_list(pr_t),
    }


def multiclass_metrics(y_true, logits_or_probs, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1, confusion matrix.

    ``logits_or_probs`` is [N, C] (argmax taken; the same for logits and
    probabilities) or already-predicted labels [N].  Rows of ``confusion_matrix``
    are true classes, columns predicted, in ``class_names`` order; all classes
    appear even when absent from the sample.
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(logits_or_probs)
    pred = s.argmax(axis=1) if s.ndim == 2 else s.reshape(-1).astype(np.int64)
    if pred.shape != y.shape:
        raise ValueError(f"y_true has {y.size} values but predictions have {pred.size}")
    labels = list(range(len(class_names)))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict = {"n": int(y.size), "accuracy": float(accuracy_score(y, pred)) if y.size else NAN}
    for k, name in enumerate(class_names):
        out[f"precision.{name}"] = float(prec[k])
        out[f"recall.{name}"] = float(rec[k])
        out[f"f1.{name}"] = float(f1[k])
        out[f"support.{name}"] = int(sup[k])
        out[f"predicted.{name}"] = int((pred == k).sum())
    out["macro_f1"] = float(np.mean(f1)) if len(labels) else NAN
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()
    out["class_names"] = list(class_names)
    return out


def regression_metrics(true_scaled, pred_scaled, scale: float) -> dict:
    """Severity errors.  Inputs are on the model's [0, 1] scale; ``scale`` (e.g.
    ``severity_max`` = 100) maps them back to the original scale, where the
    paper's MAE is reported."""
    t = np.asarray(true_scaled, dtype=np.float64).reshape(-1)
    p = np.asarray(pred_scaled, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"true has {t.size} values but pred has {p.size}")
    if t.size == 0:
        return {
            "n": 0,
            "severity_mae": NAN,
            "severity_rmse": NAN,
            "severity_mae_scaled": NAN,
            "severity_pearson_r": NAN,
        }
    mae_scaled = float(mean_absolute_error(t, p))
    rmse_scaled = float(np.sqrt(np.mean((t - p) ** 2)))
    r = NAN
    if t.size > 1 and t.std() > 0 and p.std() > 0:
        r = float(np.corrcoef(t, p)[0, 1])
    return {
        "n": int(t.size),
        "severity_mae": mae_scaled * scale,
        "severity_rmse": rmse_scaled * scale,
        "severity_mae_scaled": mae_scaled,
        "severity_pearson_r": r,
    }
