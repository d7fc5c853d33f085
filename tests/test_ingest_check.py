"""`trd-hpc ingest --check`: every problem of a folder in one pass, and the ingest report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import cli
from trd_hpc.tasks.emt.example import emt_folder


def _five_faults(root: Path) -> Path:
    """An EMT example folder with five different faults."""
    spec = emt_folder(root, n=24)
    table = root / "participants.tsv"
    df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
    df.loc[0, "trd"] = "maybe"  # 1. a label value not in `labels`
    df.loc[1, "hamd"] = "twelve"  # 2. a clinical value that is not a number
    df.to_csv(table, sep="\t", index=False)
    pid = df.loc[2, "participant_id"].removeprefix("sub-")
    next((root / f"sub-{pid}" / "func").glob("*.nii.gz")).unlink()  # 3. a subject without its image
    pid = df.loc[4, "participant_id"].removeprefix("sub-")
    next((root / f"sub-{pid}" / "func").glob("*.nii.gz")).write_bytes(b"not an image")  # 4. unreadable
    (root / "snps.txt").write_text("sid_1\nsid_2\nrs_not_there\n")  # 5. a variant not in the .bim
    d = yaml.safe_load(spec.read_text())
    d.update({"snps": {"ids": "snps.txt"}, "on_missing": "error"})
    spec.write_text(yaml.safe_dump(d))
    return spec


def test_check_reports_five_different_faults_in_one_run(tmp_path):
    spec = _five_faults(tmp_path / "src")
    r = cli("ingest", str(spec), "--check", "--report", str(tmp_path / "rep"), check=False)
    assert r.returncode != 0
    text = r.stderr
    for expected in (
        "'maybe'",  # the label value
        "'twelve'",  # the clinical value
        "lack a source",  # the missing image
        "not an image nibabel can read",
        "rs_not_there",
    ):
        assert expected in text, (expected, text)
    assert text.count("problem ") >= 5 and "5 problems" in text.strip().splitlines()[-1], text
    rep = json.loads((tmp_path / "rep" / "ingest_report.json").read_text())
    assert rep["status"] == "problems found" and len(rep["problems"]) == 5
    assert rep["availability"]["of"] == 25 and rep["availability"]["genotypes"] == 24  # nogeno1 lacks them
    assert "ingest_report" not in {p.name for p in spec.parent.iterdir()}  # nothing written into the study
    assert (tmp_path / "rep" / "ingest_report.html").read_text().count("<li") == 5


def test_a_good_folder_checks_clean_writes_nothing_and_ingests_with_its_report(tmp_path):
    spec = emt_folder(tmp_path / "src", n=24)
    before = sorted(p.name for p in spec.parent.rglob("*"))
    r = cli("ingest", str(spec), "--check")
    assert "no problem found (nothing written)" in r.stdout
    assert sorted(p.name for p in spec.parent.rglob("*")) == before
    out = tmp_path / "cohort"
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    rep = json.loads((out / "ingest_report.json").read_text())
    assert rep["status"] == "ok" and rep["kept"] == 24 and rep["dropped"][0]["participant_id"] == "nogeno1"
    assert rep["imputed"] == {"age": 1, "hamd": 1}
    g = next(iter(rep["geometry"].values()))
    assert len(g["shape"]) == 4 and len(g["voxel_mm"]) == 3 and len(g["orientation"]) == 3
    r = cli("cohort", "validate", str(out))
    assert "OK" in r.stdout


def test_bench_ingest_times_the_index_against_reading_the_headers(tmp_path):
    js = tmp_path / "bench.json"
    r = cli(
        "bench", "ingest", "--folder", "example", "--subjects", "16", "--workers", "1", "--index-subjects", "300",
        "--json", str(js),
    )  # fmt: skip
    res = json.loads(js.read_text())
    assert res["index_subjects"] == 300 and res["index_s"] > 0 and res["nibabel_headers_alone_s"] > 0
    assert res["ratio_index_vs_headers"] == res["nibabel_headers_alone_s"] / res["index_s"]
    assert "index of 300 subjects" in r.stdout and "target" in r.stdout


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", [(65, 77, 63, 5), (17, 21, 3, 4), (30, 26, 22)])
def test_separable_resampling_equals_scipy_frame_by_frame(shape, order):
    """The axis operators (three matrix products over the whole series) give what scipy's
    Gaussian pre-filter and linear affine_transform give frame by frame, edges included, on
    images smaller and larger than the grid, in either memory order."""
    from scipy import ndimage

    from trd_hpc.ingest.images import resample_space

    rng = np.random.default_rng(3)
    data = np.asarray(rng.normal(size=shape).astype(np.float32), order=order)
    grid = (48, 40, 24)
    step = np.array([shape[0] / 44, shape[1] / 37, shape[2] / 20])  # a little past both edges
    offset = np.array([-1.3, -0.6, -0.4])
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)

    def scipy_frame(vol):
        if sigma.any():
            vol = ndimage.gaussian_filter(vol, sigma, mode="nearest")
        return ndimage.affine_transform(vol, step, offset=offset, output_shape=grid, order=1, mode="constant")

    want = scipy_frame(data) if data.ndim == 3 else np.stack([scipy_frame(data[..., k]) for k in range(shape[3])], -1)
    got = resample_space(data, grid, step, offset, sigma)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert (want == 0).sum() > 0 and ((got == 0) == (want == 0)).all()  # outside the image: exactly 0


@pytest.mark.parametrize("order", ["C", "F"])
def test_temporal_resampling_is_linear_between_the_two_nearest_frames(order):
    from trd_hpc.ingest.images import to_frames

    series = np.asarray(np.random.default_rng(4).normal(size=(5, 4, 3, 7)).astype(np.float32), order=order)
    got = to_frames(series, 16, "resample")
    t = np.linspace(0, 6, 16)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, 6)
    want = series[..., lo] * (1 - (t - lo)) + series[..., hi] * (t - lo)
    assert np.allclose(got, want, atol=1e-6) and (got[..., 0] == series[..., 0]).all()
    assert (to_frames(series, 4, "crop") == series[..., :4]).all()
