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
    curves,
    expected_calibration_error,
    multiclass_metrics,
    regression_metrics,
)
from trd_hpc.eval.report import flatten, write_report


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
        F.error_histogram(t, t + rng.normal(0, 8, t.size), tmp_path / "err.png"),
        F.training_progression(hist, tmp_path / "prog.png"),
    ]
    for w in written:
        _png(w)


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
