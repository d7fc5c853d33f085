"""The generated cohorts carry the papers' effects, with the right sign and size."""

import numpy as np
import pytest

from tests.test_generate import read_all
from trd_hpc.data.generate import generate
from trd_hpc.data.manifest import load_manifest
from trd_hpc.tasks.cnn3d.cohort import make_volume_subject, region_masks
from trd_hpc.tasks.emt.cohort import make_emt_subject


@pytest.fixture(scope="module")
def emt_big(tmp_path_factory, emt_tiny):
    cfg = emt_tiny.cohort.model_copy(update={"n_subjects": 600, "subjects_per_shard": 200})
    out = tmp_path_factory.mktemp("emt600") / "c"
    generate(cfg, out, progress=False)
    return cfg, read_all(out), load_manifest(out)


def test_region_offsets_sign_and_size(emt_big):
    cfg, d, _ = emt_big
    fmri = d["fmri"].astype(np.float32)
    y = d["label"]
    for name, r in cfg.regions.items():
        (x0, x1), (y0, y1), (z0, z1) = r.box
        means = fmri[:, x0:x1, y0:y1, z0:z1, :].mean(axis=(1, 2, 3, 4))
        target = 1 if r.applies_to == "trd" else 0
        hit, other = means[y == target], means[y != target]
        # Per-subject region mean = offset + noise averaged over the box.
        assert abs(hit.mean() - r.offset_mean) < 0.02, name
        assert abs(hit.std() - r.offset_sd) < 0.02, name
        assert abs(other.mean()) < 0.01, name
    # Outside the boxes: mean 0, sd 0.08 noise.
    bg = fmri[:, 0:2, 0:2, 0:1, :]
    assert abs(bg.mean()) < 0.005 and abs(bg.std() - cfg.fmri.noise_sd) < 0.003


def test_snp_allele_frequencies_per_class(emt_big):
    cfg, d, _ = emt_big
    snp, y = d["snp"], d["label"]
    k = cfg.snp.n_predictive
    for label, probs in ((1, cfg.snp.probs_trd), (0, cfg.snp.probs_non_trd)):
        pred = snp[y == label, :k]
        freq = np.bincount(pred.ravel(), minlength=3) / pred.size
        assert np.allclose(freq, probs, atol=0.01), (label, freq)
    for label in (0, 1):
        rest = snp[y == label, k:]
        freq = np.bincount(rest.ravel(), minlength=3) / rest.size
        assert np.allclose(freq, cfg.snp.probs_other, atol=0.015)
    assert snp.max() <= 2


def test_clinical_shifts(emt_big):
    cfg, d, _ = emt_big
    clin, y = d["clinical"], d["label"]
    diff = clin[y == 1].mean(0) - clin[y == 0].mean(0)
    for j, name in enumerate(cfg.clinical.names):
        want = cfg.clinical.trd_shifts.get(name, 0.0)
        assert abs(diff[j] - want) < 0.2, (name, diff[j])
    assert abs(clin[y == 0].std(0).mean() - cfg.clinical.sd) < 0.05


def test_exact_balance_and_stratified_disjoint_splits(emt_big):
    cfg, d, m = emt_big
    y = d["label"]
    assert (y == 1).sum() == (y == 0).sum() == cfg.n_subjects // 2
    ids = {k: set(v) for k, v in m.splits.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert set().union(*ids.values()) == set(range(cfg.n_subjects))
    n = cfg.n_subjects
    assert abs(len(ids["train"]) - 0.70 * n) <= 1 and abs(len(ids["test"]) - 0.15 * n) <= 1
    for name, s in ids.items():
        frac = y[sorted(s)].mean()
        assert abs(frac - 0.5) <= 1 / len(s) + 1e-9, name


def test_emt_subject_depends_only_on_seed_and_index(emt_tiny):
    cfg = emt_tiny.cohort
    a = np.empty(cfg.fmri.shape, np.float16)
    b = np.empty(cfg.fmri.shape, np.float16)
    ra = make_emt_subject(cfg, 5, a)
    rb = make_emt_subject(cfg.model_copy(update={"n_subjects": 1000, "subjects_per_shard": 3}), 5, b)
    assert np.array_equal(a, b) and np.array_equal(ra["snp"], rb["snp"])


@pytest.fixture(scope="module")
def volumes(cnn3d_tiny):
    cfg = cnn3d_tiny.cohort.model_copy(update={"n_subjects": 400})
    out = np.empty((cfg.n_subjects, *cfg.shape), np.float32)
    labels, sev = [], []
    for i in range(cfg.n_subjects):
        r = make_volume_subject(cfg, i, out[i])
        labels.append(int(r["response"]))
        sev.append(float(r["severity"]))
    return cfg, out, np.array(labels), np.array(sev)


def test_volume_classes_near_25_50_25_and_severity_in_ranges(volumes):
    cfg, _, y, sev = volumes
    frac = np.bincount(y, minlength=3) / len(y)
    assert np.allclose(frac, cfg.class_probs, atol=0.07), frac
    for k, (lo, hi) in enumerate(cfg.severity_ranges):
        s = sev[y == k]
        assert s.min() >= lo and s.max() <= hi
        # uniform inside the range: mean near the middle, sd near width / sqrt(12)
        assert abs(s.mean() - (lo + hi) / 2) < 0.15 * (hi - lo)
        assert abs(s.std() - (hi - lo) / np.sqrt(12)) < 0.15 * (hi - lo)


def test_prefrontal_and_hippocampus_fade_with_severity(volumes):
    cfg, vols, _, sev = volumes
    masks = region_masks(cfg.shape)
    for name in ("prefrontal", "hippocampus"):
        signal = vols[:, masks[name]].mean(axis=1)
        r = np.corrcoef(signal, sev)[0, 1]
        assert r < -0.5, (name, r)


def test_volume_noise_and_intensity_shift(cnn3d_tiny):
    # Background far outside the brain is pure noise: N(0, 0.01) (the +-5 % shift of 0 is 0).
    cfg = cnn3d_tiny.cohort
    v = np.empty(cfg.shape, np.float32)
    make_volume_subject(cfg, 0, v)
    corner = v[:2, :2, :]
    assert abs(corner.std() - cfg.noise_sd) < 0.004 and abs(corner.mean()) < 0.005
