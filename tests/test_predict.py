"""The model bundle and `trd-hpc predict`: consistent with training, checked against the
schema, streamed in parts (SLURM array) and slices (torchrun), on synthetic and ingested
cohorts, labelled or not."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CONFIGS, REPO, cli
from trd_hpc.bundle import FORMAT, VERSION, load_bundle
from trd_hpc.eval.calibration import apply_calibrator, make_calibrator
from trd_hpc.predict import read_predictions
from trd_hpc.tasks.cnn3d.example import cnn3d_folder


@pytest.fixture(scope="module")
def emt_run(tmp_path_factory, emt_cohort_dir):
    out = tmp_path_factory.mktemp("emt_predict") / "run"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(out),
        "--quiet",
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=3",
        "train.num_threads=1",
        "eval.baselines=[]",
        "tracking.wandb=false",
    )
    return out


def test_bundle_holds_everything_predict_needs(emt_run):
    b = load_bundle(emt_run)
    meta = json.loads((emt_run / "bundle" / "bundle.json").read_text())
    assert (meta["format"], meta["version"]) == (FORMAT, VERSION)
    for f in meta["files"]:
        assert (emt_run / "bundle" / f).is_file(), f
    assert set(b.calibrators["fitted"]) == {"platt", "isotonic", "temperature"}
    assert b.calibrators["default"] in b.calibrators["fitted"]
    assert [c["name"] for c in b.schema["inputs"]] == ["fmri", "snp", "clinical"]
    card = json.loads((emt_run / "bundle" / "model_card.json").read_text())
    assert card["training_data"]["synthetic"] is True and "synthetic" in card["limitations"][0]
    # 10 test subjects: no interval (tests/test_statistics_limits.py has a run with them)
    assert card["confidence_intervals_95"] == {"not_computed": "n = 10 < 20: too few for a CI"}
    # each saved calibrator predicts what the fitted one does
    val = np.load(emt_run / "predictions" / "val.npz")
    for m, state in b.calibrators["fitted"].items():
        fitted = make_calibrator(m).fit(val["logit"], val["label"])
        np.testing.assert_allclose(
            apply_calibrator(state, val["logit"]), fitted.predict_proba(val["logit"]), atol=1e-12
        )


def test_predict_the_test_split_gives_the_training_runs_probabilities(emt_run, emt_cohort_dir, tmp_path):
    out = tmp_path / "p.csv"
    r = cli("predict", str(emt_run), "--cohort", str(emt_cohort_dir), "--out", str(out), "--quiet")
    assert "predictions:" in r.stdout
    df = read_predictions(out)
    z = np.load(emt_run / "predictions" / "test.npz")
    assert df.subject_id.tolist() == z["subject_id"].tolist()
    assert np.array_equal(df.p_trd_raw.to_numpy(), 1 / (1 + np.exp(-z["logit"].astype(np.float64))))
    b = load_bundle(emt_run)
    np.testing.assert_allclose(df.p_trd_calibrated, apply_calibrator(b.default_calibrator(), z["logit"]), rtol=1e-15)
    assert (df.predicted_label == (df.p_trd_calibrated >= 0.5)).all() and (df.label == z["label"]).all()


def test_predict_in_array_parts_and_torchrun_slices_merges_in_subject_order(emt_run, emt_cohort_dir, tmp_path):
    ref = tmp_path / "all.csv"
    cli("predict", str(emt_run), "--cohort", str(emt_cohort_dir), "--split", "all", "--out", str(ref), "--quiet")
    want = pd.read_csv(ref)
    out = tmp_path / "arr.parquet"
    for k in range(3):
        r = cli(
            "predict",
            str(emt_run),
            "--cohort",
            str(emt_cohort_dir),
            "--split",
            "all",
            "--out",
            str(out),
            "--shard-index",
            str(k),
            "--num-shards",
            "3",
            "--quiet",
        )
        assert "part written" in r.stdout
    r = cli("predict", "--out", str(out), "--finalize", check=False)
    assert r.returncode == 0, r.stderr
    got = pd.read_parquet(out)
    assert got.subject_id.tolist() == want.subject_id.tolist() == list(range(64))
    np.testing.assert_allclose(got.p_trd_raw, want.p_trd_raw, rtol=1e-5)  # other batches: float rounding only
    assert not list(tmp_path.glob("*.part-*"))
    tr = tmp_path / "torchrun.csv"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trd_hpc.cli",
        "predict",
        str(emt_run),
        "--cohort",
        str(emt_cohort_dir),
        "--split",
        "all",
        "--out",
        str(tr),
        "--quiet",
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    got = pd.read_csv(tr)
    assert got.subject_id.tolist() == list(range(64))
    np.testing.assert_allclose(got.p_trd_raw, want.p_trd_raw, rtol=1e-5)


def test_a_cohort_that_does_not_fit_is_refused_naming_each_mismatch(emt_run, tmp_path):
    other = tmp_path / "other"
    cli(
        "generate",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(other),
        "--quiet",
        "cohort.snp.n_snps=50",
        "cohort.snp.n_predictive=10",
        "cohort.clinical.names=[a,b]",
        "cohort.clinical.trd_shifts={}",
    )
    r = cli("predict", str(emt_run), "--cohort", str(other), "--out", str(tmp_path / "x.csv"), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "'snp' is (50,) per subject, the model takes (100,)" in r.stderr
    assert "'clinical' is (2,) per subject, the model takes (15,)" in r.stderr
    assert not (tmp_path / "x.csv").exists()


def test_a_bundle_of_an_unknown_format_version_is_refused(emt_run, tmp_path):
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(emt_run / "bundle", b)
    meta = json.loads((b / "bundle.json").read_text())
    meta["version"] = VERSION + 1
    (b / "bundle.json").write_text(json.dumps(meta))
    r = cli("predict", str(b), "--cohort", str(emt_run), "--out", str(tmp_path / "x.csv"), check=False)
    assert r.returncode == 1 and f"bundle format version {VERSION + 1}" in r.stderr and r.stderr.count("\n") == 1


def test_cnn_model_from_an_ingested_cohort_predicts_an_unlabelled_one(tmp_path):
    train_spec = cnn3d_folder(tmp_path / "train_src", n=30)
    train = tmp_path / "train"
    cli("ingest", str(train_spec), "--out", str(train), "--quiet")
    run = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "cnn3d_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={train}",
        "train.max_epochs=1",
        "tracking.wandb=false",
    )
    new_spec = cnn3d_folder(tmp_path / "new_src", n=7)
    d = yaml.safe_load(new_spec.read_text())
    for k in ("response_column", "severity_column", "labels"):
        d.pop(k)
    new_spec.write_text(yaml.safe_dump(d))
    new = tmp_path / "new"
    cli("ingest", str(new_spec), "--out", str(new), "--quiet")
    out = tmp_path / "p.csv"
    cli("predict", str(run), "--cohort", str(new), "--out", str(out), "--quiet")
    df = pd.read_csv(out, dtype={"participant_id": str})
    assert len(df) == 7 and df.participant_id.tolist() == [f"sub-{i:02d}" for i in reversed(range(7))]
    p = df[["p_non_responder", "p_partial_responder", "p_responder"]].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    assert set(df.predicted_class) <= {"non_responder", "partial_responder", "responder"}
    assert ((df.severity >= 0) & (df.severity <= 100)).all() and "response" not in df
    # the training cohort's test split: the severity the run recorded, on the original scale
    cli("predict", str(run), "--cohort", str(train), "--out", str(tmp_path / "t.csv"), "--quiet")
    t, z = read_predictions(tmp_path / "t.csv"), np.load(run / "predictions" / "test.npz")
    assert t.subject_id.tolist() == z["subject_id"].tolist()
    np.testing.assert_allclose(t.severity, z["severity_pred"].astype(np.float64) * 100.0, rtol=1e-12)


def test_submit_predict_runs_as_a_submitit_job(emt_run, emt_cohort_dir, tmp_path):
    out = tmp_path / "sub.csv"
    r = cli(
        "submit",
        "predict",
        str(emt_run),
        "--cohort",
        str(emt_cohort_dir),
        "--out",
        str(out),
        "--cluster",
        "local",
        "--wait",
        "--logs",
        f"{tmp_path}/logs/%j",
    )
    assert "rows=10" in r.stdout and "merged=True" in r.stdout, r.stdout
    z = np.load(emt_run / "predictions" / "test.npz")
    assert read_predictions(out).subject_id.tolist() == z["subject_id"].tolist()
    r = cli("submit", "predict", str(emt_run), "--out", str(out), "--cluster", "local", check=False)
    assert r.returncode == 2 and "needs --cohort DIR" in r.stderr


def test_explanations_are_nifti_maps_that_find_the_designed_regions(emt_run, emt_cohort_dir, tmp_path):
    """Integrated Gradients of a trained tiny EMT on the synthetic cohort: each test subject's
    map is a NIfTI over the grid; the region its class was built with ranks first (TRD:
    right amygdala / dorsolateral prefrontal; non-TRD: anterior cingulate); the designed boxes
    carry more attribution than the voxels outside them; and (Adebayo et al.'s check) maps of
    the same model with re-initialised weights do not resemble them (mean Spearman < 0.5)."""
    import nibabel as nib
    import torch
    from scipy.stats import spearmanr

    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.tasks.emt.explain import emt_attributions

    out = tmp_path / "p.csv"
    r = cli("predict", str(emt_run), "--cohort", str(emt_cohort_dir), "--out", str(out), "--explain", "--quiet")
    assert "explanations:" in r.stdout
    summary = pd.read_csv(tmp_path / "p_explanations" / "explanations.csv")
    preds = read_predictions(out)
    assert summary.subject_id.tolist() == preds.subject_id.tolist()
    b = load_bundle(emt_run)
    boxes = b.cfg.cohort.region_boxes
    hits = 0
    inside_vs_out = []
    maps = {}
    for sid, label, top, f in zip(summary.subject_id, preds.label, summary.top_regions, summary.fmri_ig_file):
        img = nib.load(tmp_path / "p_explanations" / f)
        assert img.shape == (12, 12, 8) and np.allclose(img.affine, np.eye(4))
        vol = np.abs(np.asarray(img.dataobj))
        maps[sid] = np.asarray(img.dataobj)
        first = top.split(":")[0]
        hits += first in (("right_amygdala", "dorsolateral_prefrontal") if label == 1 else ("anterior_cingulate",))
        mask = np.zeros(vol.shape, bool)
        for (x0, x1), (y0, y1), (z0, z1) in boxes.values():
            mask[x0:x1, y0:y1, z0:z1] = True
        inside_vs_out.append(vol[mask].mean() / vol[~mask].mean())
    assert hits >= 0.8 * len(summary), summary.top_regions.tolist()
    assert np.median(inside_vs_out) > 2.0, inside_vs_out
    # completeness: fMRI + clinical attributions add up to the logit's change from the baseline
    ds = CohortDataset(emt_cohort_dir, "test")
    x = ds.__getitems__(list(range(4)))
    ds.close()
    model = b.build_model()
    a = emt_attributions(model, x["fmri"], x["snp"], x["clinical"], steps=64)
    with torch.no_grad():
        delta = model(x["fmri"].float(), x["snp"], x["clinical"].float()) - model(
            torch.zeros_like(x["fmri"], dtype=torch.float32), x["snp"], torch.zeros_like(x["clinical"])
        )
    total = a["fmri"].reshape(4, -1).sum(1) + a["clinical"].sum(1)
    np.testing.assert_allclose(total, delta.numpy(), rtol=0.05, atol=0.02)
    # randomised weights: the maps change
    torch.manual_seed(1)
    for mod in model.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    rand = emt_attributions(model, x["fmri"], x["snp"], x["clinical"])["fmri"]
    rho = [spearmanr(a["fmri"][i].ravel(), rand[i].ravel())[0] for i in range(4)]
    assert np.mean(rho) < 0.5, rho


def test_snp_attributions_find_the_predictive_snps_where_the_signal_is(tmp_path):
    """On the default cohort the fMRI boxes alone separate the classes and a trained EMT leans
    on them; here they and the clinical shifts are switched off, so only the first 20 of 100
    SNPs carry signal.  Integrated Gradients of the trained tiny EMT must then rank them at
    the top (every one of the 10 highest-scoring SNPs predictive; predictive vs the rest
    separated with AUC > 0.9), per subject in ``--explain``'s summary too, and the same model
    with re-initialised weights must not (AUC < 0.75)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.tasks.emt.explain import emt_attributions

    run, cohort = tmp_path / "run", tmp_path / "cohort"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        "--generate",
        f"data.cohort={cohort}",
        "cohort.n_subjects=256",
        *(
            f"cohort.regions.{r}.offset_mean=0"
            for r in ("right_amygdala", "dorsolateral_prefrontal", "anterior_cingulate")
        ),
        "cohort.clinical.trd_shifts={}",
        "train.max_epochs=10",
        "train.num_threads=1",
        "eval.baselines=[]",
        "tracking.wandb=false",
    )
    b = load_bundle(run)
    n_pred = b.cfg.cohort.snp.n_predictive
    ds = CohortDataset(cohort, "test", prepare_with=b.cfg.cohort)
    x = ds.__getitems__(list(range(len(ds))))
    ds.close()
    model = b.build_model()

    def ranking(m):
        score = np.abs(emt_attributions(m, x["fmri"], x["snp"], x["clinical"])["snp"]).mean(0)
        is_pred = np.arange(len(score)) < n_pred
        return roc_auc_score(is_pred, score), np.argsort(-score, kind="stable")

    auc, order = ranking(model)
    assert auc > 0.9 and (order[:10] < n_pred).all(), (auc, order[:20])
    # the per-subject summary: most of each subject's top three SNPs are predictive (0.82 here)
    out = tmp_path / "p.csv"
    cli("predict", str(run), "--cohort", str(cohort), "--out", str(out), "--explain", "--quiet")
    summary = pd.read_csv(tmp_path / "p_explanations" / "explanations.csv")
    tops = [int(t.split(":")[0].removeprefix("snp_")) for row in summary.top_snps for t in row.split(";")]
    assert np.mean(np.array(tops) < n_pred) > 0.7, summary.top_snps.tolist()  # chance: 0.2
    torch.manual_seed(1)
    for mod in model.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    rand_auc = ranking(model)[0]
    assert rand_auc < 0.75


def test_cnn_explanations_are_gradcam_maps_per_head(tmp_path, volume_cohort_dir):
    import nibabel as nib

    run = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "cnn3d_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={volume_cohort_dir}",
        "train.max_epochs=1",
        "train.num_threads=1",
        "tracking.wandb=false",
    )
    out = tmp_path / "p.csv"
    cli(
        "predict",
        str(run),
        "--cohort",
        str(volume_cohort_dir),
        "--out",
        str(out),
        "--explain",
        "--subjects",
        "0,5",
        "--split",
        "all",
        "--quiet",
    )
    s = pd.read_csv(tmp_path / "p_explanations" / "explanations.csv")
    assert s.subject_id.tolist() == [0, 5]
    for f in list(s.gradcam_response_file) + list(s.gradcam_severity_file):
        img = nib.load(tmp_path / "p_explanations" / f)
        v = np.asarray(img.dataobj)
        assert img.shape == (24, 24, 8) and np.isfinite(v).all() and v.min() >= 0


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_export_loads_without_trd_hpc_and_matches_pytorch(emt_run, emt_cohort_dir, tmp_path, fmt):
    """The exported EMT, loaded in a fresh interpreter with torch / onnxruntime alone (trd_hpc
    not importable), gives the PyTorch model's logits on real test subjects (max |diff| <= 1e-4)."""
    import torch

    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.tasks import make_task

    out = tmp_path / f"emt.{fmt}"
    r = cli("export", str(emt_run), "--format", fmt, "--out", str(out))
    assert "exported:" in r.stdout and out.is_file()
    b = load_bundle(emt_run)
    ds = CohortDataset(emt_cohort_dir, "test")
    x = ds.__getitems__(list(range(5)))
    ds.close()
    inp = make_task(b.cfg).inputs(x, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = b.build_model()(**inp).numpy()
    np.savez(tmp_path / "x.npz", **{k: v.numpy() for k, v in inp.items()})
    load = {
        "torchscript": "torch.jit.load(F)(*[torch.from_numpy(x[k]) for k in K]).detach().numpy()",
        "pt2": "torch.export.load(F).module()(*[torch.from_numpy(x[k]) for k in K]).detach().numpy()",
        "onnx": "__import__('onnxruntime').InferenceSession(F).run(None, {k: x[k] for k in K})[0]",
    }[fmt]
    code = (
        "import sys; sys.modules['trd_hpc'] = None\n"  # trd-hpc not installed, as far as this process knows
        "import numpy as np, torch\n"
        f"F, K = {str(out)!r}, ['fmri', 'snp', 'clinical']\n"
        f"x = np.load({str(tmp_path / 'x.npz')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, {load})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-4)


def test_export_to_an_unknown_format_is_refused(emt_run, tmp_path):
    r = cli("export", str(emt_run), "--format", "tflite", "--out", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "invalid choice: 'tflite'" in r.stderr


def test_bench_predict_reports_the_ratio_and_memory_of_both_cohorts(tmp_path):
    """The benchmark runs end to end on a model it trains (--config) and says what it measured."""
    js = tmp_path / "b.json"
    r = cli("bench", "predict", "--config", str(CONFIGS / "emt_tiny.yaml"), "--subjects", "16", "--json", str(js))
    res = json.loads(js.read_text())
    assert res["subjects"] == 160 and set(res["peak_rss_mb"]) == {"16", "160"}
    assert res["ratio"] == pytest.approx(res["predict_subjects_per_s"] / res["bare_forward_subjects_per_s"])
    assert "ratio" in r.stdout and res["rss_ratio_10x"] > 0
