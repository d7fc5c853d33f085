"""ComBat site harmonisation (spec key ``harmonize:``): fitted on the training split only,
applied as neuroCombat applies it to the subjects it was fitted on, stored with the cohort and
the model's bundle, used again for new subjects of the fitted sites; fitting on all subjects,
a site without training subjects and 4-D series are refused."""

from __future__ import annotations

import json

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CONFIGS, cli
from trd_hpc.ingest import harmonize as H
from trd_hpc.ingest.example import ANATOMICAL, write_table
from trd_hpc.tasks.cnn3d.example import cnn3d_folder

N, SITES = 40, 4


def _sites_data(rng, n=60, f=300, sites=3):
    """Subjects x features with a site shift and scale, a sex and an age effect."""
    site = np.array([f"s{i % sites}" for i in range(n)])
    sex = np.array(["F" if (i // sites) % 2 else "M" for i in range(n)])
    age = rng.uniform(20, 70, n)
    k = np.array([int(s[1:]) for s in site])
    x = rng.normal(0, 1, (n, f)) * (1 + 0.5 * k)[:, None] + 3.0 * k[:, None]
    x += (sex == "F")[:, None] * rng.normal(0, 1, f) + 0.05 * age[:, None]
    return x, site, {"sex": sex}, {"age": age}


def test_apply_on_the_fitted_subjects_is_neurocombat_and_a_new_subject_is_corrected_as_they_were():
    import pandas as pd
    from neuroCombat import neuroCombat

    rng = np.random.default_rng(0)
    x, site, cats, conts = _sites_data(rng)
    est = H.fit(x, site, cats, conts)
    ours = H.apply(est, x, site, cats, conts)
    covars = pd.DataFrame({"site": site, "sex": cats["sex"], "age": conts["age"]})
    want = neuroCombat(x.T, covars, "site", categorical_cols=["sex"], continuous_cols=["age"])["data"].T
    assert np.allclose(ours, want, rtol=1e-5, atol=1e-4)
    # the site means of a feature differ by ~3 per site before, and are close after
    before = [x[site == s].mean() for s in est["sites"]]
    after = [ours[site == s].mean() for s in est["sites"]]
    assert np.ptp(before) > 5 and np.ptp(after) < 0.3 * np.ptp(before)
    # a new subject identical to training subject 7 (site, covariates, volume) gets its values
    new = H.apply(est, x[[7]], site[[7]], {"sex": cats["sex"][[7]]}, {"age": conts["age"][[7]]})
    assert np.allclose(new[0], ours[7], rtol=1e-6, atol=1e-5)
    # a site or a category the estimates do not know is refused by name
    with pytest.raises(Exception, match="s9"):
        H.apply(est, x[[0]], np.array(["s9"]), {"sex": cats["sex"][[0]]}, {"age": conts["age"][[0]]})
    with pytest.raises(Exception, match="'sex'.*X"):
        H.apply(est, x[[0]], site[[0]], {"sex": np.array(["X"])}, {"age": conts["age"][[0]]})


def test_estimates_file_round_trips_and_a_damaged_or_pickled_one_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    x, site, cats, conts = _sites_data(rng, f=50)
    est = H.fit(x, site, cats, conts)
    H.save(est, tmp_path / "h.npz")
    back = H.read(tmp_path / "h.npz")
    assert H.content_sha256(back) == H.content_sha256(est)
    bad = dict(est, gamma=est["gamma"][:, :3])
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(Exception, match="bad.npz.*damaged"):
        H.read(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", **dict(est, sites=np.array([{"x": 1}], dtype=object)))
    with pytest.raises(Exception, match="obj.npz: not a harmonisation estimates file"):
        H.read(tmp_path / "obj.npz")


def _study(root, harmonize: dict | None = None, sites: int = SITES, **spec_extra):
    """The cnn3d example folder (its spec) with N subjects of nibabel's anatomical image given a
    site offset and scale, an age effect and noise, written as real NIfTI files, and a table
    with their site and age."""
    extra = {"harmonize": {"site_column": "site", "continuous": ["age"], **(harmonize or {})}, **spec_extra}
    spec = cnn3d_folder(root, n=N, spec_extra={"subjects_per_shard": 16, **extra})
    src = nib.load(ANATOMICAL[0])
    base = np.asarray(src.dataobj, dtype=np.float32)
    rng = np.random.default_rng(3)
    rows = []
    for i in range(N):
        k, cls = i % sites, i % 3
        age = 20 + (i * 7) % 50
        vol = base * (1 + 0.2 * k) + 15.0 * k + 0.3 * age + rng.normal(0, 4, base.shape).astype(np.float32)
        nib.save(
            nib.Nifti1Image(vol.astype(np.float32), src.affine), root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii"
        )
        rows.append([f"sub-{i:02d}", ["non", "partial", "full"][cls], 20 + 30 * cls + i % 5, f"site{k}", age])
    write_table(root / "participants.csv", ["participant_id", "outcome", "madrs", "site", "age"], rows)
    return spec


def _volumes(cohort) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(cohort.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for pid, v in zip(f["participant_id"][:], f["volume"][:]):
                out[pid.decode()] = v
    return out


@pytest.fixture(scope="module")
def harmonised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harmonised")
    spec = _study(tmp / "study")
    cohort = tmp / "cohort"
    cli("ingest", str(spec), "--out", str(cohort), "--quiet")
    return spec, cohort


def test_ingest_fits_on_the_training_split_only_and_the_shards_hold_the_harmonised_volumes(harmonised, tmp_path):
    from trd_hpc.ingest.images import NiftiReader

    spec, cohort = harmonised
    man = json.loads((cohort / "manifest.json").read_text())
    rec = man["source"]["harmonization"]
    train = man["splits"]["train"]
    assert rec["fitted_on"] == f"train: {len(train)} subjects" and rec["sites"] == [f"site{k}" for k in range(SITES)]
    assert rec["fit_on"] == "train" and 0 < rec["voxels_harmonised"] <= rec["voxels"] == 24 * 24 * 8
    est = H.read(cohort / "harmonization.npz")
    assert H.content_sha256(est) == rec["sha256"] == man["config"]["resolved"]["harmonization"]["sha256"]
    # each stored volume is its resampled image with the estimates applied
    table = pd.read_csv(spec.parent / "participants.csv").set_index("participant_id")
    stored = _volumes(cohort)
    for pid in ("sub-03", "sub-10"):
        raw = NiftiReader().to_grid(spec.parent / pid / "anat" / f"{pid}_T1w.nii", pid, (24, 24, 8))[0]
        want = H.apply(est, raw[None], [table.loc[pid, "site"]], {}, {"age": [table.loc[pid, "age"]]})[0]
        assert np.allclose(stored[pid], want, atol=1e-4)
        assert not np.allclose(stored[pid], raw, atol=1e-2)
    # fitted on the training split only: a test subject's image changed leaves the estimates as
    # they were; a training subject's changes them
    test_pid, train_pid = (f"sub-{man['splits'][k][0]:02d}" for k in ("test", "train"))  # table order
    shas = {}
    for who, pid in (("test", test_pid), ("train", train_pid)):
        study = tmp_path / who
        s2 = _study(study)
        p = study / pid / "anat" / f"{pid}_T1w.nii"
        img = nib.load(p)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 3 + 50, img.affine), p)
        cli("ingest", str(s2), "--out", str(tmp_path / f"c-{who}"), "--quiet")
        shas[who] = json.loads((tmp_path / f"c-{who}" / "manifest.json").read_text())["source"]["harmonization"]
    assert shas["test"]["sha256"] == rec["sha256"]
    assert shas["train"]["sha256"] != rec["sha256"]


def test_fitting_on_all_subjects_is_refused_and_nothing_is_written(tmp_path):
    spec = _study(tmp_path / "study", harmonize={"fit_on": "all"})
    r = cli("ingest", str(spec), "--out", str(tmp_path / "cohort"), check=False)
    assert r.returncode != 0 and not (tmp_path / "cohort").exists()
    assert "'harmonize.fit_on': 'all' is refused: only 'train'" in r.stderr, r.stderr


def test_a_site_without_training_subjects_or_a_4d_series_is_refused_by_name(tmp_path):
    # the split keeps sites whole, so whole sites land in val/test: ComBat has nothing for them
    spec = _study(tmp_path / "a", sites=8, site_column="site")
    r = cli("ingest", str(spec), "--check", check=False)
    assert r.returncode != 0 and "have no training subject" in r.stderr, r.stderr
    from trd_hpc.tasks.emt.example import emt_folder

    emt = emt_folder(tmp_path / "emt", n=12, spec_extra={"harmonize": {"site_column": "site"}})
    r = cli("ingest", str(emt), "--check", check=False)
    assert r.returncode != 0 and "spec key 'harmonize'" in r.stderr and "4-D" in r.stderr, r.stderr


def test_the_bundle_carries_the_estimates_and_predict_from_a_folder_applies_them(harmonised, tmp_path):
    spec, cohort = harmonised
    run = tmp_path / "run"
    cli(
        "train", str(CONFIGS / "cnn3d_tiny.yaml"), "--out", str(run), "--quiet", f"data.cohort={cohort}",
        "train.max_epochs=1", "eval.baselines=[]", "tracking.wandb=false",
    )  # fmt: skip
    bundle = run / "bundle"
    assert H.content_sha256(H.read(bundle / "harmonization.npz")) == H.content_sha256(
        H.read(cohort / "harmonization.npz")
    )
    pre = json.loads((bundle / "preprocessing.json").read_text())["harmonization"]
    assert pre["file"] == "harmonization.npz" and pre["fitted_on"].startswith("train: ")
    want = tmp_path / "cohort.csv"
    cli("predict", str(run), "--cohort", str(cohort), "--split", "all", "--out", str(want), "--quiet")
    got = tmp_path / "folder.tsv"
    cli("predict", str(run), "--bids", str(spec.parent), "--out", str(got), "--quiet")
    a, b = pd.read_csv(want), pd.read_csv(got, sep="\t")
    both = a.merge(b, on="participant_id", suffixes=("", "_folder"))
    assert len(both) == N
    assert np.allclose(both["p_responder"], both["p_responder_folder"], atol=1e-6)
    # a cohort of the same volumes not harmonised with the model's estimates is refused
    plain = _study(tmp_path / "plain")
    raw = yaml.safe_load(plain.read_text())
    raw.pop("harmonize")
    plain.write_text(yaml.safe_dump(raw))
    cli("ingest", str(plain), "--out", str(tmp_path / "plain-cohort"), "--quiet")
    r = cli("predict", str(run), "--cohort", str(tmp_path / "plain-cohort"), check=False)
    assert r.returncode != 0 and "trained on ComBat-harmonised volumes" in r.stderr, r.stderr
