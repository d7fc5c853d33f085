"""Statistics that know their limits, and reports that say what they are.

A calibrator fitted to too few subjects is not fitted; one that collapsed (a temperature at
its bound, outputs of 1e-9 and 0.9999999) is flagged and never the bundle's default; no CI
rests on fewer than MIN_CI_SUBJECTS test subjects; every report names its data, and the
papers' figures stand beside the papers' own synthetic cohorts only."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.conftest import cli, train_tiny
from trd_hpc.eval.calibration import (
    COLLAPSE_EPS,
    MIN_PER_CLASS,
    IsotonicCalibrator,
    PlattCalibrator,
    TemperatureCalibrator,
    degenerate,
    make_calibrator,
)
from trd_hpc.tasks.emt.example import emt_folder


# ------------------------------------------------------------------ calibrators
def _noisy(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, 1.5 * (y - 0.5) + rng.normal(0, 1, n)  # overlapping classes: a real calibration problem


def test_a_calibrator_on_overlapping_scores_is_not_degenerate():
    y, z = _noisy()
    for m in ("platt", "isotonic", "temperature"):
        assert degenerate(make_calibrator(m).fit(z, y), z) is None, m


def test_separable_scores_collapse_temperature_and_isotonic_and_each_says_why():
    y = np.tile([0, 1], 12)
    z = np.where(y == 1, 4.0, -4.0) + np.linspace(-0.5, 0.5, y.size)  # perfectly separated
    t = TemperatureCalibrator().fit(z, y)
    assert "stopped at the lower bound" in degenerate(t, z)
    assert (t.predict_proba(z) < COLLAPSE_EPS).any()  # the 1e-9 the issue saw
    assert "collapsed" in degenerate(IsotonicCalibrator().fit(z, y), z)
    # Platt's smoothed targets ((N+ + 1) / (N+ + 2)) keep it off 0 and 1: the usable one here
    platt = PlattCalibrator().fit(z, y)
    p = platt.predict_proba(z)
    assert degenerate(platt, z) is None and COLLAPSE_EPS < p.min() and p.max() < 1 - COLLAPSE_EPS


def test_a_reversed_or_flat_map_is_degenerate():
    y, z = _noisy()
    assert "slope" in degenerate(PlattCalibrator().fit(-z, y), -z)  # ranks reversed: a <= 0
    flat = IsotonicCalibrator().fit(np.zeros_like(z), y)
    assert "constant output" in degenerate(flat, z)


def test_too_few_validation_subjects_of_a_class_fit_nothing():
    y = np.array([0] * 20 + [1] * (MIN_PER_CLASS - 1))
    z = np.linspace(-1, 1, y.size)
    for m in ("platt", "isotonic", "temperature"):
        with pytest.raises(
            ValueError, match=f"20 negative and {MIN_PER_CLASS - 1} positive .* at least {MIN_PER_CLASS}"
        ):
            make_calibrator(m).fit(z, y)
    y[-MIN_PER_CLASS:] = 1
    make_calibrator("platt").fit(z, y)  # MIN_PER_CLASS of each: fitted


# ------------------------------------------------------------------ runs and their reports
@pytest.fixture(scope="module")
def separable_run(tmp_path_factory):
    """The issue's case: the tiny synthetic cohort is separable, so the temperature stops at its
    bound; the config asks for it as the default anyway.  160 subjects: 24 in val and test."""
    out = tmp_path_factory.mktemp("limits") / "run"
    return train_tiny(
        out,
        "--generate",
        f"data.cohort={out.parent / 'cohort'}",
        "cohort.n_subjects=160",
        "train.num_threads=1",
        "eval.default_calibrator=temperature",
        epochs=3,
    )


def test_a_degenerate_default_is_replaced_flagged_and_explained(separable_run):
    m = json.loads((separable_run / "metrics.json").read_text())
    assert "lower bound" in m["calibrated.temperature.degenerate"], "precondition: T stopped at its bound"
    cal = json.loads((separable_run / "bundle" / "calibrators.json").read_text())
    assert cal["default"] != "temperature" and "temperature" in cal["degenerate"]
    assert "eval.default_calibrator=temperature not used (T = " in cal["chosen_by"]
    card = (separable_run / "bundle" / "model_card.md").read_text()
    assert "**temperature is degenerate, never the default**" in card
    html = (separable_run / "report.html").read_text()
    assert "DEGENERATE, not used as the default" in html


def test_cis_on_enough_subjects_and_the_synthetic_banner(separable_run):
    card = json.loads((separable_run / "bundle" / "model_card.json").read_text())
    lo, hi = card["confidence_intervals_95"]["accuracy"]
    m = json.loads((separable_run / "metrics.json").read_text())
    assert lo <= m["test.accuracy"] <= hi and m["test.n"] == 24
    html = (separable_run / "report.html").read_text()
    assert re.search(r'class="banner synthetic"[^>]*>Data: synthetic cohort \(paper 000 generator, seed \d+\)', html)
    assert "say nothing about real patients" in html and "paper 000" in html
    assert "95 % CI" in html and "no confidence intervals" not in html


def test_a_small_test_split_gets_no_ci_and_says_why(emt_cohort_dir, tmp_path):
    out = train_tiny(tmp_path / "run", f"data.cohort={emt_cohort_dir}")
    html = (out / "report.html").read_text()
    assert "no confidence intervals (n = 10 &lt; 20: too few for a CI)" in html
    assert "no CI" in html and not re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", html)
    card = (out / "bundle" / "model_card.md").read_text()
    assert "n = 10 < 20: too few for a CI" in card


@pytest.fixture(scope="module")
def ingested_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    spec = emt_folder(root / "study", n=24)
    cohort = root / "cohort"
    cli("ingest", str(spec), "--out", str(cohort), "--quiet")
    return spec, train_tiny(root / "run", f"data.cohort={cohort}")


def test_a_report_of_real_data_claims_nothing_synthetic(ingested_run):
    spec, run = ingested_run
    html = (run / "report.html").read_text()
    banner = re.search(r'class="banner ingested"[^>]*>([^<]*)<', html)
    assert banner and f"ingested from {spec.parent}" in banner.group(1) and "manifest sha256" in banner.group(1)
    assert "paper 000" not in html and "synthetic" not in banner.group(1)
    assert "generated effect" not in html and "predictive SNPs" not in html
    figs = json.loads((run / "figures" / "index.json").read_text())
    assert "fMRI slices" in figs and "fMRI slices with regions" not in figs


def test_figures_of_real_data_name_participants(ingested_run):
    from trd_hpc.rundir import RunDir
    from trd_hpc.tasks.emt.evaluate import _examples

    spec, run = ingested_run
    examples, _, _ = _examples(RunDir(run).config())
    table = (spec.parent / "participants.tsv").read_text()
    for title in examples:
        pid = re.fullmatch(r"(non-)?TRD \((.+)\)", title).group(2)
        assert pid in table and not pid.startswith("subject "), title


def test_the_identity_line_says_synthetic_virtual_or_ingested_and_where_from():
    from trd_hpc.data.manifest import identity_line

    syn = {"origin": "synthetic", "generator": "paper 001", "seed": 3, "manifest_sha256": "ab" * 32}
    assert identity_line(syn) == "synthetic cohort (paper 001 generator, seed 3), manifest sha256 abababababab"
    assert "virtual: regenerated in the loader" in identity_line({**syn, "virtual": True})
    real = {"origin": "ingested", "spec_folder": "/data/s", "table_sha256": "cd" * 32, "manifest_sha256": "ef" * 32}
    assert (
        identity_line(real)
        == "ingested from /data/s (participants table sha256 cdcdcdcdcdcd), manifest sha256 efefefefefef"
    )
