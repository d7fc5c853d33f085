"""fMRI from a BIDS derivatives folder laid out as fMRIPrep writes it (made from nilearn's
shipped MNI152 template: trd_hpc/tasks/emt/example.py fmriprep_folder): images found by their
entities (pybids' patterns), confounds regressed with nilearn, and each fault of such a folder
named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CONFIGS, cli
from trd_hpc.tasks.emt.example import fmriprep_folder

FUNC = "derivatives/fmriprep/sub-{k}/func"


def _motion_correlation(cohort: Path, src: Path) -> list[float]:
    """Per subject: correlation of the stored series' brain mean with its trans_x."""
    out = []
    for shard in sorted(cohort.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            for x, pid in zip(f["fmri"][...], f["participant_id"][...]):
                k = pid.decode()[4:]
                conf = pd.read_csv(
                    src / FUNC.format(k=k) / f"sub-{k}_task-rest_desc-confounds_timeseries.tsv", sep="\t"
                )
                x = x.astype(np.float64)
                brain = np.abs(x).sum(axis=-1) > 0
                out.append(float(np.corrcoef(x[brain].mean(axis=0), conf["trans_x"])[0, 1]))
    return out


@pytest.fixture(scope="module")
def fmriprep(tmp_path_factory):
    src = tmp_path_factory.mktemp("fmriprep")
    spec = fmriprep_folder(src, n=24)
    out = src.parent / (src.name + "_cohort")
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert "24 subjects" in r.stdout
    return spec, out


def test_a_derivatives_folder_ingests_with_its_confounds_regressed_out(fmriprep, tmp_path):
    spec, out = fmriprep
    src = spec.parent
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["images_from"]["derivatives"] == "derivatives/fmriprep"
    assert source["images_from"]["generated_by"] == ["trd-hpc example-data"]
    assert source["confounds"]["columns"][:6] == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    cleaned = _motion_correlation(out, src)
    # the same folder without the confounds section: the artefact stays
    d = yaml.safe_load(spec.read_text())
    d.pop("confounds")
    raw_spec = src / "spec_raw.yaml"
    raw_spec.write_text(yaml.safe_dump(d))
    cli("ingest", str(raw_spec), "--out", str(tmp_path / "raw"), "--quiet")
    raw = _motion_correlation(tmp_path / "raw", src)
    assert len(cleaned) == len(raw) == 24
    assert min(raw) > 0.9, raw  # the global artefact follows trans_x
    assert max(abs(c) for c in cleaned) < 0.05, cleaned


def test_the_emt_trains_on_a_derivatives_cohort(fmriprep, tmp_path):
    spec, out = fmriprep
    run = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={out}",
        "train.max_epochs=2",
        "eval.baselines=[]",
        "tracking.wandb=false",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cohort"]["kind"] == "ingested_emt" and metrics["epochs_run"] == 2


def _copy(spec: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(spec.parent, dst, symlinks=True)
    return dst / "spec.yaml"


def _ingest_error(spec: Path, tmp_path: Path) -> str:
    r = cli("ingest", str(spec), "--out", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and not (tmp_path / "out").exists(), r.stdout + r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_two_runs_of_one_subject_are_named_with_the_entity_that_tells_them_apart(fmriprep, tmp_path):
    spec = _copy(fmriprep[0], tmp_path)
    func = spec.parent / FUNC.format(k="003")
    bold = next(func.glob("*_desc-preproc_bold.nii.gz"))
    shutil.copyfile(bold, func / bold.name.replace("_task-rest_", "_task-rest_run-2_"))
    line = _ingest_error(spec, tmp_path)
    assert "subject 003 has 2 files" in line and "run:" in line, line


def test_a_subject_without_bold_or_confounds_is_named_with_the_file_fmriprep_would_write(fmriprep, tmp_path):
    spec = _copy(fmriprep[0], tmp_path)
    func = spec.parent / FUNC.format(k="005")
    next(func.glob("*_desc-preproc_bold.nii.gz")).unlink()
    (spec.parent / FUNC.format(k="007") / "sub-007_task-rest_desc-confounds_timeseries.tsv").unlink()
    line = _ingest_error(spec, tmp_path)
    assert "2 subject(s) lack a source" in line, line
    assert "sub-005_task-rest_space-MNI152NLin2009aSym_desc-preproc_bold.nii.gz" in line, line
    assert "no confounds TSV" in line and "sub-007_task-rest_desc-confounds_timeseries.tsv" in line, line


def test_a_confound_column_the_strategy_needs_is_named_with_its_file(fmriprep, tmp_path):
    spec = _copy(fmriprep[0], tmp_path)
    tsv = spec.parent / FUNC.format(k="002") / "sub-002_task-rest_desc-confounds_timeseries.tsv"
    df = pd.read_csv(tsv, sep="\t", keep_default_na=False)
    df.drop(columns=["csf"]).to_csv(tsv, sep="\t", index=False)
    line = _ingest_error(spec, tmp_path)
    assert "subject sub-002" in line and tsv.name in line and "csf" in line, line


def test_confounds_with_a_path_template_or_an_unknown_strategy_are_refused(fmriprep, tmp_path):
    spec = _copy(fmriprep[0], tmp_path)
    d = yaml.safe_load(spec.read_text())
    d["confounds"]["strategy"] = "motion+wm+nope"
    spec.write_text(yaml.safe_dump(d))
    line = _ingest_error(spec, tmp_path)
    assert "confounds.strategy" in line and "'nope'" in line and "motion24" in line, line
    d["confounds"]["strategy"] = "motion"
    d["fmri"] = "sub-{id}/func/bold.nii.gz"
    spec.write_text(yaml.safe_dump(d))
    line = _ingest_error(spec, tmp_path)
    assert "confounds needs fmri: {derivatives" in line, line
