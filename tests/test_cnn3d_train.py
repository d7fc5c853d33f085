"""Paper 001's model through the shared trainer: DDP + exact resume, cross-validation, learning."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import CONFIGS, cli
from trd_hpc.data.manifest import load_manifest

TINY = str(CONFIGS / "cnn3d_tiny.yaml")


def cnn_cmd(out, cohort, *overrides, nproc=1, resume=False):
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = base + [
        "-m",
        "trd_hpc.cli",
        "train",
        TINY,
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        f"data.cohort={cohort}",
        "train.num_threads=1",
        *overrides,
    ]
    return cmd + (["--resume"] if resume else [])


def test_folds_are_stratified_disjoint_and_cover_every_subject(volume_cohort_dir):
    m = load_manifest(volume_cohort_dir)
    labels = m.labels()
    overall = np.bincount(labels, minlength=3) / len(labels)
    seen = np.zeros(m.n_subjects, dtype=int)
    for k, fold in enumerate(m.folds):
        seen[fold] += 1
        frac = np.bincount(labels[fold], minlength=3) / len(fold)
        assert np.abs(frac - overall).max() < 0.06, (k, frac)
    assert (seen == 1).all()


# DDP kill/resume of the CNN at every fault point: tests/test_faults.py


def test_cv_writes_fold_runs_and_mean_sd(tmp_path, volume_cohort_dir):
    out = tmp_path / "cv"
    r = cli(
        "cv",
        TINY,
        "--folds",
        "5",
        "--out",
        str(out),
        "--quiet",
        f"data.cohort={volume_cohort_dir}",
        "train.max_epochs=1",
        "train.num_threads=1",
    )
    assert "5-fold cross-validation" in r.stdout
    s = json.loads((out / "cv_summary.json").read_text())
    accs = [json.loads((out / f"fold-{k}" / "metrics.json").read_text())["test.accuracy"] for k in range(5)]
    assert s["mean.test.accuracy"] == pytest.approx(np.mean(accs))
    assert s["sd.test.accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert "mean.test.severity_mae" in s and len(s["per_fold.test.severity_mae"]) == 5
    # Each fold is tested on its own held-out fold.
    m = load_manifest(volume_cohort_dir)
    for k in range(5):
        with np.load(out / f"fold-{k}" / "predictions" / "test.npz") as z:
            assert sorted(z["subject_id"].tolist()) == sorted(m.folds[k])
    bad = cli("cv", TINY, "--folds", "3", "--out", str(out), f"data.cohort={volume_cohort_dir}", check=False)
    assert bad.returncode == 2 and "cohort.split.folds" in bad.stderr

    # the same command again keeps the finished folds and retrains only a lost one
    args = ["cv", TINY, "--folds", "5", "--out", str(out), f"data.cohort={volume_cohort_dir}"]
    args += ["train.max_epochs=1", "train.num_threads=1"]
    (out / "fold-3" / "report.html").unlink()  # fold 3 stopped during its evaluation
    kept = {k: (out / f"fold-{k}" / "metrics.json").stat().st_mtime_ns for k in range(5)}
    again = cli(*args)
    assert [k for k in range(5) if f"fold {k}: finished before, kept" in again.stdout] == [0, 1, 2, 4], again.stdout
    now = {k: (out / f"fold-{k}" / "metrics.json").stat().st_mtime_ns for k in range(5)}
    assert [k for k in range(5) if now[k] != kept[k]] == [3]
    # a finished fold of another config is not kept: the resume check names the key
    other = cli(*args, "train.lr=0.01", check=False)
    assert other.returncode != 0 and "train.lr" in other.stderr, other.stderr


@pytest.mark.slow
def test_tiny_cnn_learns_response_and_severity(tmp_path, volume_cohort_dir):
    out = tmp_path / "run"
    cli("train", TINY, "--out", str(out), "--quiet", "--no-eval", f"data.cohort={volume_cohort_dir}")
    m = json.loads((out / "metrics.json").read_text())
    # Chance is 0.5 (the majority class) and a class-only severity guess scores MAE ~8.3-10.
    assert m["test.accuracy"] >= 0.8, m
    assert m["test.severity_mae"] <= 12.0, m
