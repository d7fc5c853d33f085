"""The figures of the two papers, as small PNGs.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg rendering, no
pyplot): no global state and no GUI backend, so this is safe in worker
processes and on headless nodes.  Every function takes plain arrays, writes
``path`` (parent folders created) and returns it as a ``Path``; a ``*_figure`` function
returns the ``Figure`` its namesake writes, so tests can read its axes without a PNG.

Image panels of one figure share one colour scale and its colour bar; count axes have
integer ticks; every figure is at most ~1000 px wide at ``DPI`` (the report scales it down
to the page, never crops it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from sklearn.neighbors import KernelDensity

from trd_hpc.eval.importance import as_box

DPI = 110
CLASS_NAMES = ("non-TRD", "TRD")
CLASS_COLORS = ("tab:blue", "tab:red")
# The CNN's three response classes, in class order (non-responder ... responder).
RESPONSE_COLORS = ("tab:red", "tab:orange", "tab:green")
# Probability panels (densities, violins, reliability) one colour per calibration method.
METHOD_COLORS = ("black", "tab:purple", "tab:green", "tab:brown", "tab:olive", "tab:cyan")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:  # a constrained-layout figure (colour bars) lays itself out
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5
    ax.set_ylabel(ylabel)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return drew


def _labels_probs(y, prob) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y).reshape(-1).astype(int), np.asarray(prob, dtype=float).reshape(-1)


def _integer_counts(axis) -> None:
    # counts are whole subjects: no ticks at 2.5 subjects
    axis.set_major_locator(MaxNLocator(integer=True))


def _panels(prob, prob_calibrated, calibrated_label: str) -> dict[str, np.ndarray]:
    """``{panel title: probabilities}``: ``prob`` itself when it is such a mapping (one panel
    per calibration method), else "uncalibrated" and, when given, the calibrated ones."""
    if isinstance(prob, Mapping):
        return {k: np.asarray(v, dtype=float).reshape(-1) for k, v in prob.items()}
    panels = {"uncalibrated": np.asarray(prob, dtype=float).reshape(-1)}
    if prob_calibrated is not None:
        panels[calibrated_label] = np.asarray(prob_calibrated, dtype=float).reshape(-1)
    return panels


def shared_limits(images: Sequence[np.ndarray], percentiles: tuple[float, float] = (1, 99)) -> tuple[float, float]:
    """One (vmin, vmax) for a set of image panels, so that equal grey means equal signal in
    every panel; percentiles rather than min/max, so one hot voxel does not wash out the rest."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in images])
    lo, hi = np.percentile(values, percentiles)
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(lo) + 0.5)


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


def probability_densities_figure(
    y, prob, prob_calibrated=None, threshold: float = 0.5, calibrated_label: str = "calibrated"
) -> Figure:
    """Histogram of P(TRD) per true class, one panel per calibration method (``prob`` a mapping
    ``{method: probabilities}``), all on one count axis.  Counts on shared bins, not densities:
    a class whose scores sit within 0.01 of each other (common after calibration) is then a
    tall bar of n subjects, not a density spike of height 4000 that hides the other class."""
    y = np.asarray(y).reshape(-1).astype(int)
    panels = _panels(prob, prob_calibrated, calibrated_label)
    ncol = min(2, len(panels))
    nrow = -(-len(panels) // ncol)
    fig = Figure(figsize=(3.7 * ncol, 2.7 * nrow + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(nrow, ncol, squeeze=False, sharex=True, sharey=True)).ravel()
    edges = np.linspace(0, 1, 21)
    for ax, (title, p) in zip(axes, panels.items()):
        for c in (0, 1):
            v = p[y == c]
            if v.size:
                ax.hist(v, bins=edges, histtype="stepfilled", alpha=0.3, color=CLASS_COLORS[c])
                ax.hist(
                    v,
                    bins=edges,
                    histtype="step",
                    lw=1.8,
                    color=CLASS_COLORS[c],
                    label=f"{CLASS_NAMES[c]} (n={v.size})",
                )
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        _integer_counts(ax.yaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.supxlabel("predicted P(TRD)", fontsize=10)
    fig.supylabel("test subjects", fontsize=10)
    return fig


def probability_densities(
    y, prob, path, prob_calibrated=None, threshold: float = 0.5, calibrated_label: str = "calibrated"
) -> Path:
    """See :func:`probability_densities_figure`; writes ``path``."""
    return _save(probability_densities_figure(y, prob, prob_calibrated, threshold, calibrated_label), path)


def reliability_diagram(y, probs: Mapping[str, Any], path, n_bins: int = 10, flagged=()) -> Path:
    """Observed fraction of TRD against mean predicted P(TRD) per equal-width bin (the bins of
    ``metrics.reliability_bins``, the same as metrics.json's ECE), one line per calibration
    method, each point labelled with its number of test subjects (a point of 1 subject says
    little); below, how many each method puts in each bin.  Methods in ``flagged``
    (degenerate: eval.calibration.degenerate) say so in the legend: a calibrator collapsed
    onto 0/1 puts its points on the diagonal's two ends, which would otherwise look perfect."""
    from trd_hpc.eval.metrics import expected_calibration_error, reliability_bins

    y = np.asarray(y).reshape(-1).astype(int)
    fig = Figure(figsize=(5.6, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    edges = np.linspace(0, 1, n_bins + 1)
    for k, (name, p) in enumerate(probs.items()):
        p = np.asarray(p, dtype=float).reshape(-1)
        color = METHOD_COLORS[k % len(METHOD_COLORS)]
        if y.size:
            b = reliability_bins(y, p, n_bins)
            count = np.asarray(b["count"])
            keep = count > 0
            mean, frac = np.asarray(b["mean_prob"])[keep], np.asarray(b["frac_pos"])[keep]
            ece = expected_calibration_error(y, p, n_bins)
            label = f"{name} (ECE {ece:.3f}" + (", DEGENERATE)" if name in flagged else ")")
            top.plot(mean, frac, marker="o", ms=4, color=color, ls=":" if name in flagged else "-", label=label)
            for mx, fy, n in zip(mean, frac, count[keep]):
                top.annotate(
                    str(int(n)), (mx, fy), textcoords="offset points", xytext=(3, 3 + 6 * k), fontsize=6, color=color
                )
        bottom.hist(p, bins=edges, histtype="step", lw=1.5, color=color)
    top.set(
        ylabel="observed fraction TRD",
        xlim=(0, 1),
        ylim=(-0.02, 1.05),
        title=f"Reliability ({n_bins} bins, {y.size} test subjects; numbers: subjects per point)",
    )
    top.title.set_fontsize(9)
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted P(TRD)", ylabel="subjects")
    _integer_counts(bottom.yaxis)
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def _exponent(largest: float) -> int:
    """A power of ten to divide an axis by when its numbers are tiny or huge (0.0016 -> -3), so
    the ticks read 1.6 and the label says the factor, instead of matplotlib's offset text
    floating under the axis's corner."""
    if not np.isfinite(largest) or largest <= 0 or 1e-2 <= largest < 1e4:
        return 0
    return int(np.floor(np.log10(largest)))


def feature_importance_figure(
    importance: Mapping[str, Mapping[str, float]],
    top_k: int = 12,
    units: Mapping[str, str] | None = None,
    references: Mapping[str, tuple[float, str]] | None = None,
    highlight: Mapping[str, tuple[Sequence[str], str]] | None = None,
) -> Figure:
    """One horizontal bar panel per modality (e.g. fMRI regions, SNPs, clinical), stacked, each
    with its ``top_k`` largest entries.  The modalities' numbers are different quantities
    (attribution per voxel, per variable, attention weight), so each panel keeps its own axis,
    labelled with ``units[modality]``; ``references[modality] = (x, label)`` draws a dashed
    line (e.g. uniform attention) and ``highlight[modality] = (names, label)`` colours those
    entries (e.g. the SNPs the cohort made predictive)."""
    units, references, highlight = units or {}, references or {}, highlight or {}
    # an importance that could not be computed (NaN: e.g. a region outside an ingested grid) has no bar
    finite = {m: {n: v for n, v in d.items() if np.isfinite(v)} for m, d in importance.items()}
    mods = [(m, finite[m]) for m, d in importance.items() if finite[m]]
    sizes = [min(top_k, len(d)) for _, d in mods] or [1]
    fig = Figure(figsize=(7.2, 0.22 * sum(sizes) + 1.15 * len(sizes)), layout="constrained")
    axes = fig.subplots(len(sizes), 1, squeeze=False, gridspec_kw={"height_ratios": [n + 3 for n in sizes]})[:, 0]
    for ax, (mod, d) in zip(axes, mods):
        items = sorted(d.items(), key=lambda nv: nv[1], reverse=True)[:top_k][::-1]
        names, vals = zip(*items)
        marked, marked_label = highlight.get(mod, ((), ""))
        colors = ["tab:purple" if n in set(marked) else "tab:gray" for n in names]
        exp = _exponent(max(abs(v) for v in vals))
        ax.barh(range(len(vals)), np.asarray(vals) / 10.0**exp, color=colors, height=0.7)
        ax.set_yticks(range(len(vals)), labels=[n.replace("_", " ") for n in names], fontsize=8)
        ax.set_ylim(-0.6, len(vals) - 0.4)
        ax.set_title(f"{mod}: top {len(vals)} of {len(d)}", fontsize=9, loc="left")
        scale = f" (\u00d7 1e{exp})" if exp else ""
        ax.set_xlabel(units.get(mod, "importance") + scale, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        handles = []
        if mod in references:
            x, label = references[mod]
            handles.append(ax.axvline(x / 10.0**exp, color="k", ls="--", lw=1, label=label))
        if any(c == "tab:purple" for c in colors):
            handles.append(Rectangle((0, 0), 1, 1, color="tab:purple", label=marked_label))
        if handles:  # above the panel, right of its title: not over the bars
            ax.legend(handles=handles, fontsize=7, loc="lower right", bbox_to_anchor=(1, 1), ncol=2, frameon=False)
    if not mods:
        axes[0].text(0.5, 0.5, "no importances", ha="center", va="center")
    return fig


def feature_importance_plot(importance: Mapping[str, Mapping[str, float]], path, top_k: int = 12, **kw) -> Path:
    """See :func:`feature_importance_figure`; writes ``path``."""
    return _save(feature_importance_figure(importance, top_k, **kw), path)


def fmri_slices_figure(volume_4d_by_class: Mapping[str, np.ndarray], regions: Mapping[str, Any]) -> Figure:
    """One row per example (e.g. "TRD", "non-TRD"), one column per region: the
    time-averaged axial slice through the middle of the region's z range, with
    every region cutting that slice outlined and the column's region in red.
    All panels share one grey scale (and its colour bar), so a brighter region in the
    TRD row is brighter signal, not another panel's contrast stretch."""
    boxes = {name: as_box(r) for name, r in regions.items()}
    targets = list(boxes.items()) or [("", None)] * 4  # no regions: four depths through the volume
    panels = []  # (row, col, class, region name, z, slice)
    for i, (cls, vol) in enumerate(volume_4d_by_class.items()):
        v = np.asarray(vol, dtype=np.float32)
        mean = v.mean(axis=3) if v.ndim == 4 else v
        for j, (name, box) in enumerate(targets):
            depth = (2 * j + 1) * mean.shape[2] // (2 * len(targets))
            z = (box[2][0] + box[2][1] - 1) // 2 if box else min(depth, mean.shape[2] - 1)
            panels.append((i, j, cls, name, z, mean[:, :, z].T))  # x left-right, y posterior-anterior
    vmin, vmax = shared_limits([p[-1] for p in panels])
    nrow, ncol = len(volume_4d_by_class), len(targets)
    fig = Figure(figsize=(2.4 * ncol + 1.0, 2.4 * nrow + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(nrow, ncol, squeeze=False))
    im = None
    for i, j, cls, name, z, img in panels:
        ax = axes[i, j]
        im = ax.imshow(img, origin="lower", cmap="gray", vmin=vmin, vmax=vmax)
        for other, ob in boxes.items():
            if ob[2][0] <= z < ob[2][1]:
                (x0, x1), (y0, y1), _ = ob
                color = "red" if other == name else "yellow"
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
                if other != name:  # the column's own region is named in the title
                    ax.text(x0 - 0.5, y1, other.replace("_", " "), color=color, fontsize=7, va="bottom")
        ax.set_title(f"{cls}: z={z}" + (f"\n{name.replace('_', ' ')}" if name else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="signal (mean over time)")
    return fig


def fmri_slices_with_regions(volume_4d_by_class: Mapping[str, np.ndarray], regions: Mapping[str, Any], path) -> Path:
    """See :func:`fmri_slices_figure`; writes ``path``."""
    return _save(fmri_slices_figure(volume_4d_by_class, regions), path)


def snp_allele_histograms(snp, y, n_predictive: int, path) -> Path:
    """Genotype (0/1/2 minor alleles) frequencies by class, pooled over the
    predictive SNPs (the first ``n_predictive``) and over the others."""
    g = np.asarray(snp).astype(int)
    y = np.asarray(y).reshape(-1).astype(int)
    groups = [
        (f"predictive SNPs (first {n_predictive})", g[:, :n_predictive]),
        (
            f"other SNPs ({g.shape[1] - n_predictive})" if n_predictive else f"all {g.shape[1]} SNPs",
            g[:, n_predictive:],
        ),
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


def _violin_stats(v: np.ndarray, min_bandwidth: float = 0.03) -> dict:
    """A violin's outline (``Axes.violin``'s input) from a Gaussian KDE whose bandwidth is
    Silverman's but at least ``min_bandwidth``, drawn out 2 bandwidths past the data (inside
    [0, 1]).  matplotlib's own violinplot draws only between min and max with the sample's
    bandwidth, so 5 scores within 0.001 of each other came out as an invisible hairline."""
    bw = max(min_bandwidth, 1.06 * float(v.std()) * v.size**-0.2)
    coords = np.linspace(max(0.0, v.min() - 2 * bw), min(1.0, v.max() + 2 * bw), 120)
    dens = np.exp(KernelDensity(bandwidth=bw).fit(v[:, None]).score_samples(coords[:, None]))
    return {
        "coords": coords,
        "vals": dens,
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def confidence_violins_figure(y, prob, prob_calibrated=None, calibrated_label: str = "calibrated") -> Figure:
    """Predicted P(TRD) per true class (violin, median line, the subjects as points), one
    pair of violins per calibration method (``prob`` a mapping ``{method: probabilities}``),
    side by side on one P(TRD) axis."""
    y = np.asarray(y).reshape(-1).astype(int)
    panels = _panels(prob, prob_calibrated, calibrated_label)
    fig = Figure(figsize=(max(4.4, 1.7 * len(panels) + 1.2), 3.8), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # the same jitter every time: a report rewritten is the same picture
    for k, p in enumerate(panels.values()):
        for c in (0, 1):
            v = p[y == c]
            if v.size == 0:
                continue
            x = k + (c - 0.5) * 0.42
            parts = ax.violin([_violin_stats(v)], positions=[x], widths=0.38, showextrema=False, showmedians=True)
            for body in parts["bodies"]:
                body.set_facecolor(CLASS_COLORS[c])
                body.set_edgecolor(CLASS_COLORS[c])
                body.set_alpha(0.3)
            parts["cmedians"].set_color(CLASS_COLORS[c])
            ax.scatter(x + rng.uniform(-0.07, 0.07, v.size), v, s=9, color=CLASS_COLORS[c], alpha=0.8, zorder=3)
    for c in (0, 1):
        ax.scatter([], [], color=CLASS_COLORS[c], label=f"{CLASS_NAMES[c]} (n={int((y == c).sum())})")
    ax.axhline(0.5, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(panels)), labels=list(panels))
    ax.set(ylabel="predicted P(TRD)", ylim=(-0.03, 1.03), xlim=(-0.6, len(panels) - 0.4))
    ax.set_title("Confidence by class and calibration method", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def confidence_violins(y, prob, path, prob_calibrated=None, calibrated_label: str = "calibrated") -> Path:
    """See :func:`confidence_violins_figure`; writes ``path``."""
    return _save(confidence_violins_figure(y, prob, prob_calibrated, calibrated_label), path)


# --------------------------------------------------------------------------- 3-D CNN (paper 001)
def confusion_matrix_plot(cm, class_names: Sequence[str], path, title: str = "Confusion matrix") -> Path:
    """Counts (and the share of the true class) with row-normalised colour, so rare classes
    are as visible; the colour bar reads as that share."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    fig = Figure(figsize=(1.0 * n + 2.6, 0.9 * n + 1.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n({100 * norm[i, j]:.0f} %)",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    labels = [c.replace("_", " ") for c in class_names]
    ax.set_xticks(range(n), labels=labels, rotation=20, fontsize=8)
    ax.set_yticks(range(n), labels=labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, shrink=0.85, label="share of the true class")
    return _save(fig, path)


def severity_scatter_figure(
    true,
    pred,
    unit: str = "",
    classes=None,
    class_names: Sequence[str] = (),
    ranges: Sequence[tuple[float, float]] | None = None,
) -> Figure:
    """Predicted vs true severity on the original scale, identity line dashed; points
    coloured by true class (``classes``, indices into ``class_names``) and each class's
    severity range (``ranges``, the cohort's ``severity_ranges``) shaded as the band a
    prediction must fall in to be on that class's side of the boundaries."""
    t = np.asarray(true, dtype=float).reshape(-1)
    p = np.asarray(pred, dtype=float).reshape(-1)
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.subplots()
    names = [n.replace("_", " ") for n in class_names]
    for k, (lo, hi) in enumerate(ranges or ()):
        color = RESPONSE_COLORS[k % len(RESPONSE_COLORS)]
        ax.axhspan(lo, hi, color=color, alpha=0.1, lw=0)
        for edge in (lo, hi):
            ax.axvline(edge, color=color, ls=":", lw=1)
    if classes is None:
        ax.scatter(t, p, s=12, alpha=0.7)
    else:
        c = np.asarray(classes).reshape(-1).astype(int)
        for k in np.unique(c):
            label = names[k] if k < len(names) else f"class {k}"
            rng_txt = f" ({ranges[k][0]:g}-{ranges[k][1]:g})" if ranges and k < len(ranges) else ""
            ax.scatter(t[c == k], p[c == k], s=14, alpha=0.8, color=RESPONSE_COLORS[k % 3], label=label + rng_txt)
    both = np.concatenate([t, p]) if t.size else np.array([0.0, 1.0])
    lo, hi = float(both.min()), float(both.max())
    if ranges:
        lo, hi = min(lo, min(r[0] for r in ranges)), max(hi, max(r[1] for r in ranges))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    mae = float(np.mean(np.abs(p - t))) if t.size else float("nan")
    ax.set(xlabel=f"true severity{unit}", ylabel=f"predicted severity{unit}", title=f"Severity (MAE {mae:.2f})")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def severity_scatter(true, pred, path, unit: str = "", **kw) -> Path:
    """See :func:`severity_scatter_figure`; writes ``path``."""
    return _save(severity_scatter_figure(true, pred, unit, **kw), path)


def error_histogram_figure(true, pred) -> Figure:
    """Histogram of predicted - true severity (subjects per bin), MAE in the title."""
    err = np.asarray(pred, dtype=float).reshape(-1) - np.asarray(true, dtype=float).reshape(-1)
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    # numpy's "auto" bins suit the sample size (30 fixed bins left 36 subjects 1 per bar)
    bins = np.histogram_bin_edges(err, bins="auto") if err.size > 1 else 10
    ax.hist(err, bins=bins, color="tab:gray", edgecolor="white")
    ax.axvline(0, color="r", ls="--", lw=1)
    mae = float(np.mean(np.abs(err))) if err.size else float("nan")
    ax.set(xlabel="predicted - true severity", ylabel="test subjects", title=f"Severity error (MAE {mae:.2f})")
    _integer_counts(ax.yaxis)
    ax.grid(axis="y", alpha=0.3)
    return fig


def error_histogram(true, pred, path) -> Path:
    """See :func:`error_histogram_figure`; writes ``path``."""
    return _save(error_histogram_figure(true, pred), path)


def example_volumes_figure(examples: Mapping[str, Sequence[tuple[str, np.ndarray]]]) -> Figure:
    """The middle axial slice of a few volumes per class (``{class: [(panel title, 3-D
    volume), ...]}``), one row per class, all on one grey scale with its colour bar."""
    rows = [(cls, vols) for cls, vols in examples.items() if vols]
    ncol = max((len(v) for _, v in rows), default=1)
    slices = [
        [(title, np.asarray(v, dtype=np.float32)[:, :, v.shape[2] // 2].T) for title, v in vols] for _, vols in rows
    ]
    vmin, vmax = shared_limits([img for row in slices for _, img in row] or [np.zeros(1)])
    fig = Figure(figsize=(1.9 * ncol + 1.0, 2.0 * max(1, len(rows)) + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(max(1, len(rows)), ncol, squeeze=False))
    im = None
    for i, ((cls, _), row) in enumerate(zip(rows, slices)):
        for j in range(ncol):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.set_visible(False)
                continue
            title, img = row[j]
            im = ax.imshow(img, origin="lower", cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(cls.replace("_", " "), fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="intensity (model input)")
    return fig


def example_volumes(examples: Mapping[str, Sequence[tuple[str, np.ndarray]]], path) -> Path:
    """See :func:`example_volumes_figure`; writes ``path``."""
    return _save(example_volumes_figure(examples), path)


def training_progression(history: Sequence[Mapping[str, Any]], path) -> Path:
    """Accuracy, severity MAE and loss per epoch, train vs validation."""
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 3)
    for ax, (metric, ylabel) in zip(
        axes, [("accuracy", "accuracy"), ("severity_mae", "severity MAE"), ("loss", "loss")]
    ):
        _plot_keys(ax, history, [(f"train.{metric}", "train"), (f"val.{metric}", "validation")], ylabel)
        ax.set_title(ylabel[0].upper() + ylabel[1:])
    return _save(fig, path)
