"""Region x time fMRI through a labels atlas (nilearn's maskers) from an fMRIPrep-layout folder
(made from nilearn's MNI152 template and a labels image of the brain's octants): the series
are nilearn's, the EMT trains on region tokens, and importance is reported per named region."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CONFIGS, cli
from trd_hpc.tasks.emt.example import fmriprep_folder

REGIONS = [
    f"{x}_{y}_{z}" for x in ("left", "right") for y in ("posterior", "anterior") for z in ("inferior", "superior")
]


def _shards(out: Path) -> dict[str, np.ndarray]:
    got: dict[str, list] = {}
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for k in ("fmri", "participant_id", "label"):
                got.setdefault(k, []).append(f[k][...])
    return {k: np.concatenate(v) for k, v in got.items()}


@pytest.fixture(scope="module")
def atlas_cohort(tmp_path_factory):
    src = tmp_path_factory.mktemp("atlas_src")
    spec = fmriprep_folder(src, n=32, atlas=True)
    out = src.parent / (src.name + "_cohort")
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    return spec, out


def test_region_series_are_nilearns_masker_on_each_subjects_bold(atlas_cohort):
    from nilearn.maskers import NiftiLabelsMasker

    spec, out = atlas_cohort
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["atlas"]["regions"] == REGIONS
    a = _shards(out)
    assert a["fmri"].shape == (32, 8, 40)
    cols = m["source"]["confounds"]["columns"]
    for i in (0, 5):
        k = a["participant_id"][i].decode()[4:]
        func = spec.parent / "derivatives" / "fmriprep" / f"sub-{k}" / "func"
        conf = pd.read_csv(func / f"sub-{k}_task-rest_desc-confounds_timeseries.tsv", sep="\t")[cols].to_numpy()
        masker = NiftiLabelsMasker(
            str(spec.parent / "atlas" / "octants_dseg.nii.gz"), standardize="zscore_sample", detrend=True
        )
        want = masker.fit_transform(str(next(func.glob("*_desc-preproc_bold.nii.gz"))), confounds=conf).T
        np.testing.assert_allclose(a["fmri"][i].astype(np.float64), want, atol=5e-3)


def test_the_trd_oscillation_shows_in_its_region_alone(atlas_cohort):
    _, out = atlas_cohort
    a = _shards(out)
    x = a["fmri"].astype(np.float64)
    c = x - x.mean(axis=2, keepdims=True)
    ac1 = (c[:, :, 1:] * c[:, :, :-1]).mean(axis=2) / (c * c).mean(axis=2)  # [subjects, regions]
    trd = a["label"] == 1
    gap = ac1[trd].mean(axis=0) - ac1[~trd].mean(axis=0)
    j = REGIONS.index("left_anterior_superior")
    assert gap[j] > 0.3, gap
    assert np.abs(np.delete(gap, j)).max() < 0.15, gap


@pytest.fixture(scope="module")
def atlas_run(atlas_cohort, tmp_path_factory):
    _, out = atlas_cohort
    run = tmp_path_factory.mktemp("atlas_run") / "run"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={out}",
        "model.time_patch=10",
        "train.max_epochs=2",
        "eval.baselines=[late_fusion_mlp,random_forest]",
        "tracking.wandb=false",
    )
    return run


def test_the_emt_trains_on_region_tokens_with_importance_per_named_region(atlas_cohort, atlas_run, tmp_path):
    _, out = atlas_cohort
    run = atlas_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {f"importance.fmri.{r}" for r in REGIONS} <= set(metrics)
    assert "left_anterior_superior" in (run / "report.html").read_text()
    import torch

    state = torch.load(run / "model.pt", weights_only=True)
    assert tuple(state["pos_embed"].shape)[0] == 8 * (40 // 10)  # one token per region and 10 frames
    assert tuple(state["patch_embed.weight"].shape)[1] == 10
    # predict --explain names regions, and writes no voxel map (there is none)
    pred = tmp_path / "pred.csv"
    r = cli("predict", str(run), "--cohort", str(out), "--out", str(pred), "--explain", "--quiet")
    assert "scores per region" in r.stdout, r.stdout
    ex = pd.read_csv(tmp_path / "pred_explanations" / "explanations.csv")
    assert all(t.split(":")[0] in REGIONS for cell in ex["top_regions"] for t in cell.split(";"))
    assert not list((tmp_path / "pred_explanations").glob("*.nii.gz"))


def test_a_time_patch_that_does_not_divide_the_frames_is_refused(atlas_cohort, tmp_path):
    _, out = atlas_cohort
    r = cli(
        "train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(tmp_path / "r"), f"data.cohort={out}",
        "model.time_patch=7", check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "model.time_patch 7 does not divide the cohort's 40 frames" in r.stderr, r.stderr


def _copy(spec: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(spec.parent, dst)
    return dst / "spec.yaml"


def test_an_unnamed_label_and_a_region_outside_the_images_are_named(atlas_cohort, tmp_path):
    spec = _copy(atlas_cohort[0], tmp_path)
    tsv = spec.parent / "atlas" / "octants_dseg.tsv"
    tsv.write_text("\n".join(tsv.read_text().splitlines()[:-1]) + "\n")  # label 8 loses its name
    r = cli("ingest", str(spec), "--out", str(tmp_path / "o1"), check=False)
    assert r.returncode != 0 and "no name for label(s) 8" in r.stderr.strip().splitlines()[-1], r.stderr
    # an atlas reaching past the images' field of view: its region 9 has no voxel there
    atlas = nib.load(str(spec.parent / "atlas" / "octants_dseg.nii.gz"))
    labels = np.asarray(atlas.dataobj)
    bigger = np.zeros((labels.shape[0] + 3, *labels.shape[1:]), dtype=labels.dtype)
    bigger[: labels.shape[0]] = labels
    bigger[-2:, 10:14, 10:14] = 9
    nib.save(nib.Nifti1Image(bigger, atlas.affine), str(spec.parent / "atlas" / "wide_dseg.nii.gz"))
    d = yaml.safe_load(spec.read_text())
    d["atlas"] = {"image": "atlas/wide_dseg.nii.gz"}
    spec.write_text(yaml.safe_dump(d))
    r = cli("ingest", str(spec), "--out", str(tmp_path / "o2"), check=False)
    assert r.returncode != 0 and "atlas region(s) 9 have no voxel" in r.stderr, r.stderr[-2000:]


def test_predict_from_a_subject_folder_equals_ingest_then_predict(atlas_cohort, atlas_run, tmp_path):
    """`predict --bids` prepares a new subject as the bundle says (its atlas, confounds, variants,
    clinical scaling) and gets the probabilities that ingest + predict of that subject give."""
    spec, _ = atlas_cohort
    src = spec.parent
    assert (atlas_run / "bundle" / "atlas.nii.gz").is_file()  # the bundle carries the atlas
    out = tmp_path / "derivatives" / "participants_predictions.tsv"
    r = cli("predict", str(atlas_run), "--bids", str(src), "--participant-label", "004", "--out", str(out), "--quiet")
    assert "1 subjects" in r.stdout, r.stdout
    got = pd.read_csv(out, sep="\t")
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["bundle_sha256"] in r.stdout and side["subjects"] == 1 and "calibrator" in side
    # the same subject by hand: an unlabelled spec of that one subject, ingest, predict
    one = tmp_path / "one"
    shutil.copytree(src, one, symlinks=True)
    table = pd.read_csv(one / "participants.tsv", sep="\t", dtype=str)
    table[table["participant_id"] == "sub-004"].drop(columns=["trd"]).to_csv(
        one / "participants.tsv", sep="\t", index=False
    )
    d = yaml.safe_load((one / "spec.yaml").read_text())
    d.pop("label_column")
    d.pop("labels")
    (one / "spec.yaml").write_text(yaml.safe_dump(d))
    cli("ingest", str(one / "spec.yaml"), "--out", str(tmp_path / "one_cohort"), "--quiet")
    cli(
        "predict", str(atlas_run), "--cohort", str(tmp_path / "one_cohort"), "--out", str(tmp_path / "p.csv"), "--quiet"
    )
    want = pd.read_csv(tmp_path / "p.csv")
    assert got["participant_id"].tolist() == want["participant_id"].tolist() == ["sub-004"]
    assert got["p_trd_raw"].tolist() == want["p_trd_raw"].tolist()  # the same bits
    assert not (src / "derivatives" / "trd-hpc").exists()  # --out was given: nothing in the study folder
