"""Evaluation package: metrics against hand-computed values, calibration on the
paper's compressed-score case, figures, report and attributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logit
from sklearn.metrics import confusion_matrix

from trd_hpc.eval import figures as F
from trd_hpc.eval.calibration import (
    IsotonicCalibrator,
    PlattCalibrator,
    TemperatureCalibrator,
    calibrate_all,
)
from trd_hpc.eval.importance import (
    aggregate_clinical,
    aggregate_fmri_by_region,
    grad_x_input,
    permutation_importance_by_group,
    snp_importance,
    top_k,
)
from trd_hpc.eval.metrics import (
    binary_metrics,
    bootstrap_ci,
    curves,
    expected_calibration_error,
    fast_average_precision,
    fast_macro_f1,
    multiclass_metrics,
    rank_auc,
    regression_metrics,
)
from trd_hpc.eval.report import Column, Statistic, flatten, summary_table, write_report


def compressed_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's case: perfectly separated, but every probability below 0.5
    (~0.32 for non-TRD, ~0.41 for TRD).  Returns (logits, labels)."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    p = np.where(y == 1, 0.41, 0.32) + rng.uniform(-0.02, 0.02, y.size)
    return logit(p), y


# --------------------------------------------------------------------------- metrics
def test_binary_metrics_hand_computed():
    y = [0, 0, 1, 1]
    p = [0.1, 0.6, 0.4, 0.9]
    m = binary_metrics(y, p)
    assert m["n"] == 4 and m["n_pos"] == 2
    assert m["accuracy"] == pytest.approx(0.5)  # 0.1 and 0.9 right, 0.6 and 0.4 wrong
    assert m["f1"] == pytest.approx(0.5)  # tp=1, fp=1, fn=1
    assert m["auc"] == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert m["mean_prob_pos"] == pytest.approx(0.65)
    assert m["mean_prob_neg"] == pytest.approx(0.35)
    # bins: 0.1 (y0) |0.1|; 0.4 (y1) |0.6|; 0.6 (y0) |0.6|; 0.9 (y1) |0.1| each weight 1/4
    assert m["ece"] == pytest.approx(0.35)


def test_compressed_scores_auc_one_accuracy_half():
    m = binary_metrics([0, 1, 0, 1], [0.32, 0.41, 0.32, 0.41])
    assert m["auc"] == 1.0 and m["ap"] == 1.0
    assert m["accuracy"] == 0.5 and m["f1"] == 0.0
    assert m["ece"] == pytest.approx(0.5 * 0.32 + 0.5 * 0.59)


def test_ece_small_when_calibrated_large_when_not():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    over = np.clip(p + 0.3, 0, 1)  # systematically overconfident in TRD
    assert expected_calibration_error(y, over) > 0.2
    assert expected_calibration_error(y, p, n_bins=20) < 0.03


def test_single_class_is_robust():
    m = binary_metrics([1, 1, 1], [0.7, 0.8, 0.2])
    assert math.isnan(m["auc"]) and math.isnan(m["ap"]) and math.isnan(m["mean_prob_neg"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    c = curves([0, 0], [0.1, 0.2])
    assert c["roc.fpr"] == [] and c["pr.precision"] == []


def test_curves_are_json_ready():
    import json

    c = curves([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    json.dumps(c, allow_nan=False)
    assert c["roc.fpr"][0] == 0.0 and c["roc.tpr"][-1] == 1.0
    assert len(c["pr.precision"]) == len(c["pr.recall"]) == len(c["pr.thresholds"]) + 1


def test_multiclass_matches_sklearn():
    names = ["non_responder", "partial_responder", "responder"]
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 2, 2, 2, 0]] * 3.0
    m = multiclass_metrics(y, logits, names)
    pred = logits.argmax(1)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision.responder"] == pytest.approx(2 / 3)
    assert m["recall.partial_responder"] == pytest.approx(2 / 3)
    assert m["support.responder"] == 3 and m["predicted.non_responder"] == 2
    f1s = [m[f"f1.{n}"] for n in names]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    # an absent class still has a row and column
    m2 = multiclass_metrics([0, 0], np.array([0, 0]), names)
    assert np.asarray(m2["confusion_matrix"]).shape == (3, 3)


def test_regression_metrics_original_scale():
    t = np.array([0.1, 0.5, 0.9])
    p = np.array([0.2, 0.5, 0.7])
    m = regression_metrics(t, p, scale=100.0)
    assert m["severity_mae"] == pytest.approx(10.0)
    assert m["severity_mae_scaled"] == pytest.approx(0.1)
    assert m["severity_rmse"] == pytest.approx(100 * np.sqrt((0.01 + 0 + 0.04) / 3))
    assert m["severity_pearson_r"] == pytest.approx(np.corrcoef(t, p)[0, 1])
    assert math.isnan(regression_metrics([0.5, 0.5], [0.5, 0.5], 100)["severity_pearson_r"])


# --------------------------------------------------------------------------- calibration
def test_platt_and_isotonic_fix_the_compressed_case():
    zv, yv = compressed_scores(200, seed=1)
    zt, yt = compressed_scores(200, seed=2)
    res = calibrate_all(zv, yv, zt, yt, ["platt", "isotonic", "temperature"])
    raw = res["uncalibrated"]
    assert raw["auc"] == 1.0 and raw["accuracy"] == 0.5
    for m in ("platt", "isotonic"):
        assert res[m]["auc"] == pytest.approx(1.0)
        assert res[m]["accuracy"] == 1.0
        assert res[m]["ece"] < raw["ece"] / 10
        assert res[m]["brier"] < raw["brier"] / 10
    assert res["platt"]["a"] > 0


def test_temperature_cannot_fix_a_shift():
    zv, yv = compressed_scores(200, seed=1)
    zt, yt = compressed_scores(200, seed=2)
    res = calibrate_all(zv, yv, zt, yt, ["temperature"])
    t = res["temperature"]
    # z / T keeps every logit negative: the 0.5-threshold decision is unchanged.
    assert t["accuracy"] == 0.5 and t["auc"] == 1.0
    # It does minimise the validation NLL over T (T = 1 is a candidate) ...
    yv_f = yv.astype(float)

    def nll(temp):
        s = zv / temp
        return np.mean(np.logaddexp(0, s) - yv_f * s)

    assert 0.05 <= t["T"] <= 20
    assert nll(t["T"]) <= nll(1.0) + 1e-12
    assert nll(t["T"]) <= min(nll(0.5), nll(2.0))
    # ... but the shifted scores stay badly calibrated.
    assert t["ece"] > 0.3 and t["brier"] > 0.2


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 5000)
    y = (rng.uniform(size=true_logit.size) < 1 / (1 + np.exp(-true_logit))).astype(int)
    cal = TemperatureCalibrator().fit(true_logit * 3.0, y)  # overconfident by 3x
    assert cal.T == pytest.approx(3.0, rel=0.1)


def test_calibrators_accept_probabilities_and_need_both_classes():
    zv, yv = compressed_scores(40, seed=3)
    pv = 1 / (1 + np.exp(-zv))
    a = PlattCalibrator().fit(zv, yv).predict_proba(zv)
    b = PlattCalibrator(input="prob").fit(pv, yv).predict_proba(pv)
    np.testing.assert_allclose(a, b, atol=1e-6)
    iso = IsotonicCalibrator(input="prob").fit(pv, yv).predict_proba(np.array([0.0, 1.0]))
    assert iso.tolist() == [0.0, 1.0]  # clipped to the end steps
    with pytest.raises(ValueError, match="both classes"):
        PlattCalibrator().fit([0.1, 0.2], [1, 1])
    res = calibrate_all([0.1, 0.2], [1, 1], zv, yv, ["platt"])
    assert "error" in res["platt"]


# --------------------------------------------------------------------------- figures
def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return path


def test_every_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    p = np.clip(0.3 + 0.2 * y + rng.normal(0, 0.05, y.size), 0, 1)
    hist = [
        {
            "epoch": e,
            "train.loss": 1 / e,
            "val.loss": 1.2 / e,
            "val.auc": 0.5 + e / 20,
            "train.accuracy": 0.5 + e / 20,
            "val.accuracy": 0.4 + e / 20,
            "train.severity_mae": 20 / e,
        }
        for e in range(1, 6)
    ]
    vol = rng.normal(size=(12, 12, 6, 3)).astype(np.float16)
    regions = {"a": ((1, 4), (2, 5), (1, 3)), "b": {"box": ((6, 10), (6, 9), (2, 5))}}
    t = rng.uniform(0, 100, 30)
    written = [
        F.loss_and_auc_curves(hist, tmp_path / "loss.png"),
        F.roc_curve_plot(y, p, tmp_path / "roc.png"),
        F.roc_curve_plot({"emt": (y, p), "rf": (y, 1 - p)}, None, tmp_path / "roc2.png"),
        F.pr_curve_plot({"emt": (y, p), "mlp": (y, p**2)}, None, tmp_path / "pr.png"),
        F.probability_densities(y, p, tmp_path / "dens.png", prob_calibrated=y * 0.9 + 0.05),
        F.probability_densities(y[:3], p[:3], tmp_path / "dens_tiny.png"),
        F.feature_importance_plot(
            {
                "fMRI regions": {"a": 0.3, "b": 0.1},
                "SNPs": {"snp_0001": 0.2},
                "clinical": {"severity": 1.0, "age": 0.1},
            },
            tmp_path / "imp.png",
        ),
        F.fmri_slices_with_regions({"TRD": vol, "non-TRD": vol * 0.5}, regions, tmp_path / "slices.png"),
        F.snp_allele_histograms(rng.integers(0, 3, (20, 10)).astype(np.int8), y, 4, tmp_path / "snp.png"),
        F.confidence_violins(y, p, tmp_path / "violin.png", prob_calibrated=np.where(y == 1, 0.9, 0.1)),
        F.confusion_matrix_plot([[5, 0, 1], [0, 7, 0], [0, 0, 4]], ["non", "partial", "resp"], tmp_path / "cm.png"),
        F.severity_scatter(t, t + rng.normal(0, 8, t.size), tmp_path / "scatter.png"),
        F.severity_scatter(
            t,
            t + rng.normal(0, 8, t.size),
            tmp_path / "scatter_classes.png",
            classes=(t // 34).astype(int),
            class_names=["a", "b", "c"],
            ranges=[(0, 30), (35, 65), (70, 100)],
        ),
        F.reliability_diagram(y, {"uncalibrated": p, "Platt": np.clip(p + 0.1, 0, 1)}, tmp_path / "rel.png"),
        F.example_volumes(
            {"a": [("s1", vol[..., 0]), ("s2", vol[..., 1])], "b": [("s3", vol[..., 2])]}, tmp_path / "ex.png"
        ),
        F.error_histogram(t, t + rng.normal(0, 8, t.size), tmp_path / "err.png"),
        F.training_progression(hist, tmp_path / "prog.png"),
    ]
    for w in written:
        _png(w)


def _draw(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # lays the figure out, so text has its final extent
    return fig


def _overlapping(texts) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent()) for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1 :] if ba.overlaps(bb)]


def test_image_panels_share_one_grey_scale_with_a_colour_bar():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(12, 12, 6, 3)).astype(np.float32)
    regions = {"a": ((1, 4), (2, 5), (1, 3)), "b": ((6, 10), (6, 9), (2, 5))}
    # TRD 3x the signal: a per-panel stretch would make the two rows look alike
    fig = F.fmri_slices_figure({"TRD": vol * 3, "non-TRD": vol}, regions)
    ims = [im for ax in fig.axes for im in ax.get_images()]
    assert len(ims) == 4 and len({im.get_clim() for im in ims}) == 1
    assert [im for im in ims if im.colorbar is not None]  # one colour bar for all panels
    vmin, vmax = ims[0].get_clim()
    assert vmax - vmin > 2 * (np.percentile(vol.mean(3), 99) - np.percentile(vol.mean(3), 1))

    ex = F.example_volumes_figure({"x": [("1", vol[..., 0] * 2), ("2", vol[..., 1])], "y": [("3", vol[..., 2])]})
    ims = [im for ax in ex.axes for im in ax.get_images()]
    assert len(ims) == 3 and len({im.get_clim() for im in ims}) == 1
    assert [im for im in ims if im.colorbar is not None]


def test_probability_panels_name_each_calibrator_and_show_both_classes():
    y = np.array([0] * 6 + [1] * 5)
    p = np.where(y == 1, 0.72, 0.27)
    probs = {"uncalibrated": p, "Platt": np.where(y == 1, 0.999, 0.001), "isotonic": np.where(y == 1, 1.0, 0.0)}
    fig = F.probability_densities_figure(y, probs)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == list(probs)
    for ax in shown:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["non-TRD (n=6)", "TRD (n=5)"]
        ticks = ax.get_yticks()
        assert np.allclose(ticks, np.round(ticks))  # whole subjects
        assert ax.get_ylim()[1] >= 6  # counts, so a one-bin class is n tall, not a density spike
    vfig = F.confidence_violins_figure(y, probs)
    (ax,) = vfig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == list(probs)
    # scores within 0.001 of each other still give a violin that can be seen
    outline = F._violin_stats(np.full(5, 0.999))
    assert np.ptp(outline["coords"]) > 0.05


def test_count_axes_are_integers_and_importance_labels_do_not_overlap():
    fig = F.error_histogram_figure([10, 20, 30, 40, 50], [12, 18, 35, 41, 47])
    ticks = fig.axes[0].get_yticks()
    assert np.allclose(ticks, np.round(ticks))
    imp = {
        "fMRI regions": {"right_amygdala": 1.9e-3, "outside_regions": 7e-4},
        "clinical": {f"variable_{k:02d}": 0.01 / (k + 1) for k in range(15)},
        "SNPs": {f"snp_{k:04d}": 0.0125 - k * 1e-4 for k in range(100)},
    }
    fig = _draw(F.feature_importance_figure(imp, references={"SNPs": (0.01, "uniform")}))
    assert len(fig.axes) == 3 and len({round(ax.get_position().x0, 3) for ax in fig.axes}) == 1  # stacked
    for ax in fig.axes:
        assert not _overlapping(ax.get_yticklabels()), ax.get_title()
        assert not _overlapping(ax.get_xticklabels()), ax.get_title()
    assert fig.get_size_inches()[0] * F.DPI <= 1000  # fits the report's column


def test_importance_figure_leaves_out_values_that_could_not_be_computed():
    # an ingested cohort's grid may hold no voxel of a region: its importance is NaN
    imp = {"fMRI regions": {"right_amygdala": float("nan"), "outside_regions": 7e-4}, "clinical": {"age": float("nan")}}
    fig = _draw(F.feature_importance_figure(imp))
    assert len(fig.axes) == 1
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["outside regions"]


def test_severity_scatter_colours_classes_and_draws_their_ranges():
    t = np.array([10.0, 20, 50, 60, 80, 90])
    fig = F.severity_scatter_figure(
        t,
        t + 5,
        classes=[2, 2, 1, 1, 0, 0],
        class_names=["non", "partial", "resp"],
        ranges=[(70, 100), (35, 65), (0, 30)],
    )
    (ax,) = fig.axes
    labels = [x.get_text() for x in ax.get_legend().get_texts()]
    assert labels == ["non (70-100)", "partial (35-65)", "resp (0-30)", "identity"]
    assert sorted({round(line.get_xdata()[0]) for line in ax.get_lines() if line.get_linestyle() == ":"}) == [
        0,
        30,
        35,
        65,
        70,
        100,
    ]


# --------------------------------------------------------------------------- bootstrap CIs
def _auc(y, p):
    return rank_auc(y, p) if 0 < y.sum() < y.size else float("nan")


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    return y, np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2, y.size), 0, 1)


def test_bootstrap_ci_is_deterministic_holds_the_estimate_and_narrows_with_more_subjects():
    stats = {"auc": _auc, "accuracy": lambda y, p: float(np.mean((p >= 0.5) == (y == 1)))}
    y, p = _scores(40, 0)
    ci = bootstrap_ci(stats, y, p, n_boot=400, seed=3)
    assert ci == bootstrap_ci(stats, y, p, n_boot=400, seed=3)  # a fixed seed: the same report
    assert ci != bootstrap_ci(stats, y, p, n_boot=400, seed=4)
    for k, fn in stats.items():
        lo, hi = ci[k]
        assert lo <= fn(y, p) <= hi, k
    y2, p2 = _scores(1000, 0)
    wide = bootstrap_ci(stats, y2, p2, n_boot=400, seed=3)
    for k in stats:
        assert wide[k][1] - wide[k][0] < 0.5 * (ci[k][1] - ci[k][0]), k


def test_bootstrap_ci_leaves_out_undefined_draws():
    stats = {"auc": _auc, "mean": lambda y, p: float(p.mean())}
    assert bootstrap_ci(stats, [1], [0.3]) == {"auc": None, "mean": None}  # one subject
    one_class = bootstrap_ci(stats, np.ones(30, int), np.linspace(0, 1, 30), n_boot=50)
    assert one_class["auc"] is None and one_class["mean"] is not None


def test_no_bootstrap_ci_below_the_stated_number_of_subjects():
    """On 4-10 subjects a bootstrap prints [1.000, 1.000]-like certainty: below MIN_CI_SUBJECTS
    none is computed, and the summary table says so instead of showing an interval."""
    from trd_hpc.eval.metrics import MIN_CI_SUBJECTS, ci_too_small

    stats = {"mean": lambda y, p: float(p.mean())}
    n = MIN_CI_SUBJECTS
    y, p = np.tile([0, 1], n), np.linspace(0, 1, 2 * n)
    assert bootstrap_ci(stats, y[: n - 1], p[: n - 1], n_boot=50)["mean"] is None
    assert bootstrap_ci(stats, y[:n], p[:n], n_boot=50)["mean"] is not None
    assert ci_too_small(n) is None and str(n - 1) in ci_too_small(n - 1)
    st = [Statistic("auc", "ROC AUC", _auc)]
    small = summary_table(st, [Column("model", (y[:8], p[:8]))], n_boot=50)
    assert small.rows[0][1].ci == "no CI" and "no confidence intervals" in small.caption and "8 < 20" in small.caption
    big = summary_table(st, [Column("model", (y, p))], n_boot=50)
    assert big.rows[0][1].ci.startswith("[") and "95 % CI" in big.caption


def test_fast_ap_and_macro_f1_equal_sklearn():
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(5)
    for n in (3, 12, 200):
        for _ in range(10):
            y = rng.integers(0, 2, n)
            y[0] = 1
            p = np.round(rng.random(n), 1)  # ties
            assert fast_average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
            r, q = rng.integers(0, 3, n), rng.integers(0, 3, n)
            want = f1_score(r, q, average="macro", labels=[0, 1, 2], zero_division=0)
            assert fast_macro_f1(r, q, 3) == pytest.approx(want, abs=1e-12)


def test_summary_table_cells_hold_value_ci_and_paper():
    y, p = _scores(40, 1)
    stats = [
        Statistic("auc", "ROC AUC", _auc),
        Statistic("brier", "Brier", lambda y, p: float(np.mean((p - y) ** 2)), better="low"),
    ]
    cols = [Column("model", (y, p)), Column("base", (y, p**2), scored_on=("auc",))]
    t = summary_table(stats, cols, {"auc": 1.0}, "paper 000", n_boot=200)
    assert t.header == ["metric", "model", "base", "paper 000"] and "95 % CI" in t.caption
    auc, brier = t.rows
    assert auc[1].text == f"{_auc(y, p):.3f}" and auc[1].ci.startswith("[") and auc[3].text == "1.00"
    assert brier[2].text == "\u2014" and brier[3].text == "\u2014"  # not scored on it / no paper figure
    assert sum(c.best for c in auc[1:]) >= 1 and not brier[1].best  # a lone value is nobody's best


# --------------------------------------------------------------------------- report
def test_flatten_and_report(tmp_path):
    metrics = {
        "test": {"auc": 0.987654321, "accuracy": 0.5, "confusion_matrix": [[1, 0], [0, 1]]},
        "calibrated": {"platt": {"accuracy": 1.0, "a": 12.3456789}},
        "baselines": {"random_forest": {"test": {"auc": 0.93}}},
        "val": {"curve": list(range(100))},
        "epochs": 8,
    }
    flat = flatten(metrics)
    assert flat["calibrated.platt.a"] == 12.3456789
    assert flat["baselines.random_forest.test.auc"] == 0.93
    fig = F.error_histogram([1, 2, 3], [1.5, 2, 2], tmp_path / "err.png")
    out = write_report(
        tmp_path / "run",
        "EMT <run>",
        metrics,
        {"severity error": fig, "gone": tmp_path / "x.png"},
        "cohort:\n  n_subjects: 10 # <x>\n",
        notes=["a & b"],
    )
    text = out.read_text()
    assert out.name == "report.html"
    assert '<img src="data:image/png;base64,' in text
    assert "0.9877" in text and "12.35" in text and "platt.accuracy" in text
    assert "[100 values]" in text and "[[1, 0], [0, 1]]" in text
    assert "EMT &lt;run&gt;" in text and "a &amp; b" in text and "# &lt;x&gt;" in text
    assert "<details>" in text and "missing" in text
    # test, calibrated, baselines appear in that order
    assert text.index("<h3>test</h3>") < text.index("<h3>calibrated</h3>") < text.index("<h3>baselines</h3>")


# --------------------------------------------------------------------------- importance
class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fmri = torch.nn.Linear(6, 1, bias=True)
        self.clin = torch.nn.Linear(3, 1, bias=False)
        self.snp_emb = torch.nn.Embedding(3, 1)

    def forward(self, fmri, clinical, snp):
        return (self.fmri(fmri.flatten(1)) + self.clin(clinical) + self.snp_emb(snp).sum(1)).squeeze(-1)


def test_grad_x_input_linear_model_is_abs_w_times_x():
    torch.manual_seed(0)
    model = _Linear().train()
    batch = {"fmri": torch.randn(4, 2, 3).half(), "clinical": torch.randn(4, 3), "snp": torch.randint(0, 3, (4, 5))}
    attr = grad_x_input(model, batch, ["fmri", "clinical", "snp"])
    assert set(attr) == {"fmri", "clinical"}  # integer SNPs skipped
    w_f = model.fmri.weight.detach().view(2, 3)
    torch.testing.assert_close(attr["fmri"], (w_f * batch["fmri"].float()).abs())
    torch.testing.assert_close(attr["clinical"], (model.clin.weight.detach() * batch["clinical"]).abs())
    assert model.training  # mode restored
    assert model.fmri.weight.grad is None  # parameter grads untouched
    assert not batch["clinical"].requires_grad


def test_aggregate_fmri_by_region():
    a = np.zeros((2, 8, 8, 4, 3))
    a[:, 0:2, 0:2, 0:1, :] = 1.0  # region r1 fully lit
    a[0, 4:8, 4:8, 2:4, :] = 2.0  # region r2 lit in subject 0 only -> mean 1.0
    regions = {"r1": ((0, 2), (0, 2), (0, 1)), "r2": ((4, 8), (4, 8), (2, 4))}
    out = aggregate_fmri_by_region(a, regions)
    assert out["r1"] == pytest.approx(1.0) and out["r2"] == pytest.approx(1.0)
    assert out["outside_regions"] == pytest.approx(0.0)
    a[:, 7, 0, 0, :] = 5.0
    n_out = 8 * 8 * 4 - 4 - 32
    assert aggregate_fmri_by_region(torch.from_numpy(a), regions)["outside_regions"] == pytest.approx(5.0 / n_out)
    with pytest.raises(ValueError):
        aggregate_fmri_by_region(a[0], regions)


def test_clinical_snp_and_permutation_importance():
    c = aggregate_clinical(np.array([[1.0, 0.0], [3.0, 2.0]]), ["severity", "age"])
    assert c == {"severity": 2.0, "age": 1.0}
    w = np.full((2, 10), 0.05)
    w[:, :2] = 0.3  # first 2 of 10 SNPs get 0.6 of the weight
    s = snp_importance(w, n_predictive=2)
    assert s["snp_0000"] == pytest.approx(0.3) and s["snp_0009"] == pytest.approx(0.05)
    assert s["predictive_share"] == pytest.approx(0.6) and s["uniform_share"] == pytest.approx(0.2)
    assert list(top_k(s, 2, prefix="snp_")) == ["snp_0000", "snp_0001"]

    rng = np.random.default_rng(0)
    x = {"signal": rng.normal(size=200), "noise": rng.normal(size=200)}
    y = (x["signal"] > 0).astype(int)
    groups = {k: (lambda d, r, k=k: {**d, k: r.permutation(d[k])}) for k in x}
    imp = permutation_importance_by_group(lambda d: d["signal"] + 0.1 * d["noise"], x, y, groups)
    assert imp["signal"] > 0.3 and abs(imp["noise"]) < 0.05


def test_rank_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from trd_hpc.eval.metrics import rank_auc

    rng = np.random.default_rng(3)
    for n in (5, 40, 200):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = np.round(rng.random(n), 1)  # many ties
        assert rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
