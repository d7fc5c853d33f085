"""The figures of the two papers, as small PNGs.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg rendering, no
pyplot): no global state and no GUI backend, so this is safe in worker
processes and on headless nodes.  Every function takes plain arrays, writes
``path`` (parent folders created) and returns it as a ``Path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy.stats import gaussian_kde
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from trd_hpc.eval.importance import as_box

DPI = 110
CLASS_NAMES = ("non-TRD", "TRD")
CLASS_COLORS = ("tab:blue", "tab:red")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    from trd_hpc.fsio import atomic_write_with

    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))  # never half a PNG
    return path


def _column(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, values) for rows that have ``key``; None when no row has it."""
    rows = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(history) if r.get(key) is not None]
    if not rows:
        return None
    e, v = zip(*rows)
    return np.asarray(e, dtype=float), np.asarray(v, dtype=float)


def _plot_keys(ax, history, keys: Sequence[tuple[str, str]], ylabel: str) -> bool:
    drew = False
    for key, label in keys:
        col = _column(history, key)
        if col is not None:
            ax.plot(*col, marker="o", ms=3, label=label)
            drew = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return drew


def _labels_probs(y, prob) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y).reshape(-1).astype(int), np.asarray(prob, dtype=float).reshape(-1)


# --------------------------------------------------------------------------- EMT (paper 000)
def loss_and_auc_curves(history: Sequence[Mapping[str, Any]], path) -> Path:
    """Train/val loss (left) and validation AUC per epoch (right), best AUC marked."""
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    _plot_keys(ax1, history, [("train.loss", "train"), ("val.loss", "validation")], "loss")
    ax1.set_title("Loss")
    _plot_keys(ax2, history, [("train.auc", "train AUC"), ("val.auc", "validation AUC")], "ROC AUC")
    auc = _column(history, "val.auc")
    if auc is not None:
        k = int(np.nanargmax(auc[1]))
        ax2.axvline(auc[0][k], color="grey", ls=":", lw=1)
        ax2.set_title(f"Validation AUC (best {auc[1][k]:.3f} at epoch {auc[0][k]:g})")
    else:
        ax2.set_title("Validation AUC")
    return _save(fig, path)


def _curve_sets(y, prob, label: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if isinstance(y, Mapping):
        return {name: _labels_probs(*yp) for name, yp in y.items()}
    return {label: _labels_probs(y, prob)}


def roc_curve_plot(y, prob, path, label: str = "model") -> Path:
    """ROC curve(s).  ``y`` may be a dict ``name -> (y, prob)`` to overlay
    baselines (then ``prob`` is ignored and may be None)."""
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.subplots()
    for name, (yy, pp) in _curve_sets(y, prob, label).items():
        if 0 < yy.sum() < yy.size:
            fpr, tpr, _ = roc_curve(yy, pp)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(yy, pp):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pr_curve_plot(y, prob, path, label: str = "model") -> Path:
    """Precision-recall curve(s); same conventions as :func:`roc_curve_plot`.
    The dotted line is the prevalence (a random classifier's precision)."""
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.subplots()
    prevalence = None
    for name, (yy, pp) in _curve_sets(y, prob, label).items():
        if 0 < yy.sum() < yy.size:
            prec, rec, _ = precision_recall_curve(yy, pp)
            ax.step(rec, prec, where="post", label=f"{name} (AP {average_precision_score(yy, pp):.3f})")
            prevalence = yy.mean()
    if prevalence is not None:
        ax.axhline(prevalence, color="grey", ls=":", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _density(ax, values: np.ndarray, color: str, label: str) -> None:
    ax.hist(values, bins=np.linspace(0, 1, 41), density=True, alpha=0.35, color=color, label=label)
    # A KDE needs a few distinct points; a degenerate sample makes it singular.
    if values.size >= 5 and np.ptp(values) > 1e-6:
        xs = np.linspace(0, 1, 200)
        ax.plot(xs, gaussian_kde(values)(xs), color=color)


def probability_densities(
    y, prob, path, prob_calibrated=None, threshold: float = 0.5, calibrated_label: str = "calibrated"
) -> Path:
    """Per-class density of P(TRD); a second panel after calibration if given."""
    y, prob = _labels_probs(y, prob)
    panels = [("uncalibrated", prob)]
    if prob_calibrated is not None:
        panels.append((calibrated_label, np.asarray(prob_calibrated, dtype=float).reshape(-1)))
    fig = Figure(figsize=(4.6 * len(panels), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, p) in zip(axes, panels):
        for c in (0, 1):
            if (y == c).any():
                _density(ax, p[y == c], CLASS_COLORS[c], f"{CLASS_NAMES[c]} (n={(y == c).sum()})")
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set(xlabel="predicted P(TRD)", ylabel="density", title=f"Predicted probability, {title}", xlim=(0, 1))
        ax.legend(fontsize=8)
    return _save(fig, path)


def feature_importance_plot(importance: Mapping[str, Mapping[str, float]], path, top_k: int = 15) -> Path:
    """One horizontal bar panel per modality (e.g. fMRI regions, SNPs, clinical),
    each showing its ``top_k`` largest entries."""
    mods = [(m, d) for m, d in importance.items() if d]
    fig = Figure(figsize=(4.2 * max(1, len(mods)), 0.25 * min(top_k, max((len(d) for _, d in mods), default=1)) + 1.8))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(mods))))
    for ax, (mod, d) in zip(axes, mods):
        items = sorted(d.items(), key=lambda nv: nv[1], reverse=True)[:top_k][::-1]
        names, vals = zip(*items)
        ax.barh(range(len(vals)), vals, color="tab:purple")
        ax.set_yticks(range(len(vals)), labels=names, fontsize=7)
        ax.set_title(mod)
        ax.set_xlabel("importance")
        ax.grid(axis="x", alpha=0.3)
    if not mods:
        axes[0].text(0.5, 0.5, "no importances", ha="center", va="center")
    return _save(fig, path)


def fmri_slices_with_regions(volume_4d_by_class: Mapping[str, np.ndarray], regions: Mapping[str, Any], path) -> Path:
    """One row per example (e.g. "TRD", "non-TRD"), one column per region: the
    time-averaged axial slice through the middle of the region's z range, with
    every region cutting that slice outlined and the column's region in red."""
    boxes = {name: as_box(r) for name, r in regions.items()}
    rows = list(volume_4d_by_class.items())
    ncol = max(1, len(boxes))
    fig = Figure(figsize=(3.2 * ncol, 3.0 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), ncol, squeeze=False))
    for i, (cls, vol) in enumerate(rows):
        v = np.asarray(vol, dtype=np.float32)
        mean = v.mean(axis=3) if v.ndim == 4 else v
        targets = list(boxes.items()) or [("", None)]
        for j, (name, box) in enumerate(targets):
            ax = axes[i, j]
            z = (box[2][0] + box[2][1] - 1) // 2 if box else mean.shape[2] // 2
            # x runs left-right and y posterior-anterior: transpose, origin lower.
            ax.imshow(mean[:, :, z].T, origin="lower", cmap="gray")
            for other, ob in boxes.items():
                if ob[2][0] <= z < ob[2][1]:
                    (x0, x1), (y0, y1), _ = ob
                    color = "red" if other == name else "yellow"
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
                    ax.text(x0 - 0.5, y1, other, color=color, fontsize=7, va="bottom")
            ax.set_title(f"{cls}: z={z}" + (f" ({name})" if name else ""), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def snp_allele_histograms(snp, y, n_predictive: int, path) -> Path:
    """Genotype (0/1/2 minor alleles) frequencies by class, pooled over the
    predictive SNPs (the first ``n_predictive``) and over the others."""
    g = np.asarray(snp).astype(int)
    y = np.asarray(y).reshape(-1).astype(int)
    groups = [
        (f"predictive SNPs (first {n_predictive})", g[:, :n_predictive]),
        (f"other SNPs ({g.shape[1] - n_predictive})", g[:, n_predictive:]),
    ]
    groups = [(t, a) for t, a in groups if a.shape[1] > 0]
    fig = Figure(figsize=(4.4 * len(groups), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    width = 0.38
    for ax, (title, a) in zip(axes, groups):
        for c in (0, 1):
            sub = a[y == c]
            if sub.size == 0:
                continue
            freq = np.bincount(sub.ravel(), minlength=3)[:3] / sub.size
            ax.bar(
                np.arange(3) + (c - 0.5) * width,
                freq,
                width,
                color=CLASS_COLORS[c],
                label=f"{CLASS_NAMES[c]} (n={len(sub)})",
            )
        ax.set_xticks(range(3), labels=["0", "1", "2"])
        ax.set(xlabel="minor allele count", ylabel="frequency", title=title, ylim=(0, 1))
        ax.legend(fontsize=8)
    return _save(fig, path)


def confidence_violins(y, prob, path, prob_calibrated=None) -> Path:
    """Violin of predicted P(TRD) per true class, points overlaid; a calibrated
    version side by side when given."""
    y, prob = _labels_probs(y, prob)
    sets = [("uncalibrated", prob)]
    if prob_calibrated is not None:
        sets.append(("calibrated", np.asarray(prob_calibrated, dtype=float).reshape(-1)))
    fig = Figure(figsize=(4.0 * len(sets), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(sets)))
    rng = np.random.default_rng(0)
    for ax, (title, p) in zip(axes, sets):
        for c in (0, 1):
            v = p[y == c]
            if v.size == 0:
                continue
            # violinplot's KDE fails on fewer than 2 distinct values.
            if np.unique(v).size >= 2:
                parts = ax.violinplot([v], positions=[c], showmedians=True, widths=0.7)
                for body in parts["bodies"]:
                    body.set_facecolor(CLASS_COLORS[c])
                    body.set_alpha(0.35)
            ax.scatter(c + rng.uniform(-0.12, 0.12, v.size), v, s=6, color=CLASS_COLORS[c], alpha=0.6)
        ax.axhline(0.5, color="k", ls="--", lw=1)
        ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
        ax.set(ylabel="predicted P(TRD)", ylim=(0, 1), title=f"Confidence, {title}")
    return _save(fig, path)


# --------------------------------------------------------------------------- 3-D CNN (paper 001)
def confusion_matrix_plot(cm, class_names: Sequence[str], path, title: str = "Confusion matrix") -> Path:
    """Counts with row-normalised colour (so rare classes are as visible)."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    fig = Figure(figsize=(1.3 * n + 2.2, 1.2 * n + 1.6))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(n), labels=class_names, rotation=20, fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def severity_scatter(true, pred, path, unit: str = "") -> Path:
    """Predicted vs true severity on the original scale, identity line red dashed."""
    t = np.asarray(true, dtype=float).reshape(-1)
    p = np.asarray(pred, dtype=float).reshape(-1)
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.subplots()
    ax.scatter(t, p, s=10, alpha=0.6)
    both = np.concatenate([t, p]) if t.size else np.array([0.0, 1.0])
    lo, hi = float(both.min()), float(both.max())
    ax.plot([lo, hi], [lo, hi], "r--", lw=1.5, label="identity")
    mae = float(np.mean(np.abs(p - t))) if t.size else float("nan")
    ax.set(xlabel=f"true severity{unit}", ylabel=f"predicted severity{unit}", title=f"Severity (MAE {mae:.2f})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def error_histogram(true, pred, path) -> Path:
    """Histogram of predicted - true severity, MAE in the title."""
    err = np.asarray(pred, dtype=float).reshape(-1) - np.asarray(true, dtype=float).reshape(-1)
    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.subplots()
    ax.hist(err, bins=30, color="tab:gray", edgecolor="white")
    ax.axvline(0, color="r", ls="--", lw=1)
    mae = float(np.mean(np.abs(err))) if err.size else float("nan")
    ax.set(xlabel="predicted - true severity", ylabel="count", title=f"Severity error (MAE {mae:.2f})")
    return _save(fig, path)


def training_progression(history: Sequence[Mapping[str, Any]], path) -> Path:
    """Accuracy, severity MAE and loss per epoch, train vs validation."""
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    for ax, (metric, ylabel) in zip(
        axes, [("accuracy", "accuracy"), ("severity_mae", "severity MAE"), ("loss", "loss")]
    ):
        _plot_keys(ax, history, [(f"train.{metric}", "train"), (f"val.{metric}", "validation")], ylabel)
        ax.set_title(ylabel[0].upper() + ylabel[1:])
    return _save(fig, path)
