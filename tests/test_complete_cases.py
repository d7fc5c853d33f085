"""Keeping subjects without genotypes (their missing token) against dropping them: the option
``data.complete_cases`` leaves them out of train and val only, and ``trd-hpc study
missing-genotypes`` trains both arms at each rate and tabulates test AUC from the runs."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from tests.conftest import CONFIGS, cli
from trd_hpc.config import ConfigError, load_config
from trd_hpc.data.dataset import CohortDataset

COMMON = ["cohort.n_subjects=120", "cohort.subjects_per_shard=40", "cohort.missing.snp=0.3"]


@pytest.fixture(scope="module")
def missing_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("complete_cases") / "cohort"
    cli("generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(out), "--quiet", *COMMON)
    present = {}
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            present.update(zip(f["subject_id"][...].tolist(), f["present"][...].tolist()))
    return out, present


def test_complete_cases_leaves_subjects_without_genotypes_out_of_train_and_val_only(missing_cohort):
    out, present = missing_cohort
    cfg = load_config(CONFIGS / "emt_tiny.yaml", [*COMMON, "data.complete_cases=[genotypes]", f"data.cohort={out}"])
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    for role in ("train", "val", "test"):
        ds = CohortDataset(out, cfg.data.split(role), complete=cfg.data.complete(role))
        ids = set(splits[role])
        lacking = {i for i in ids if present[i][1] == 0}
        if role == "test":  # never filtered: the same test subjects with or without the option
            assert set(ds.ids.tolist()) == ids and not len(ds.left_out) and lacking
        else:
            assert set(ds.ids.tolist()) == ids - lacking and set(ds.left_out.tolist()) == lacking and lacking
            b = ds.__getitems__(list(range(len(ds))))
            assert (b["present"][:, 1] == 1).all() and set(b["subject_id"].tolist()) == ids - lacking
        ds.close()
    # fMRI is never missing here: requiring it leaves everyone in
    ds = CohortDataset(out, "train", complete=("fmri",))
    assert set(ds.ids.tolist()) == set(splits["train"])


def test_complete_cases_names_a_modality():
    with pytest.raises(ConfigError, match="data.complete_cases: snp is not a modality of the EMT"):
        load_config(CONFIGS / "emt_tiny.yaml", ["data.complete_cases=[snp]"])


def _rows(md: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in md.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def test_the_study_trains_both_arms_and_its_table_comes_from_the_runs(tmp_path):
    out = tmp_path / "study"
    r = cli(
        "study", "missing-genotypes", "--out", str(out), "--rates", "0.3", "--quiet",
        "train.max_epochs=1", "cohort.n_subjects=100",
    )  # fmt: skip
    md = (out / "missing_genotypes.md").read_text()
    assert md.strip() in r.stdout  # printed and written
    assert "cohort.seed 11" in md and "train.seed 0" in md and "100 subjects (train/val/test 60/20/20)" in md
    assert "the same 20 test subjects in every cell" in md
    rows = _rows(md)
    assert rows[0][:4] == ["genotypes missing", "train + val subjects, keep / drop", "keep: test AUC", "drop: test AUC"]
    assert len(rows) == 2 and rows[1][0] == "30 %"
    rec = json.loads((out / "missing_genotypes.json").read_text())
    assert rec["subjects"] == 100 and rec["cohort_seed"] == 11 and rec["splits"]["test"] == 20
    row = rec["rows"][0]
    preds = {}
    for arm, col in (("keep", 2), ("drop", 3)):
        cell = row[arm]
        m = json.loads((out / cell["run"] / "metrics.json").read_text())
        assert cell["test"]["auc"] == m["test.auc"] and cell["test"]["n"] == m["test.n"] == 20
        assert rows[1][col] == f"{m['test.auc']:.3f} (n=20)"
        for src in cell["sources"]:  # every number of the cell is its run's
            assert json.loads((out / src["file"]).read_text())[src["key"]] == src["value"]
        without = cell["without_genotypes"]
        assert without["too_few"] and without["n"] == m["test.by_modality.fmri+clinical.n"] < 10
        with np.load(out / cell["run"] / "predictions" / "test.npz") as f:
            preds[arm] = sorted(f["subject_id"][~f["is_pad"]].tolist())
    assert preds["keep"] == preds["drop"] == rec["test_subjects"]  # both arms scored on the same subjects
    keep, drop = row["keep"], row["drop"]
    assert drop["left_out"] > 0 and keep["left_out"] == 0
    assert (
        drop["train_subjects"] + drop["val_subjects"] + drop["left_out"]
        == keep["train_subjects"] + keep["val_subjects"]
    )
    assert re.search(r"- \(n=\d, too few\)", rows[1][4])
    # a rerun skips every finished run and writes the same table
    again = cli("study", "missing-genotypes", "--out", str(out), "--rates", "0.3", "--quiet",
                "train.max_epochs=1", "cohort.n_subjects=100")  # fmt: skip
    assert again.stdout.count("skipped") == 5 and (out / "missing_genotypes.md").read_text() == md
