"""Splits that cannot leak: sites and families kept whole (group_columns, connected through any
shared value), the splits fixed and fingerprinted when the cohort is made, and `train` refusing
a manifest whose test subjects overlap its training ones, whose groups cross splits, or whose
splits were changed since."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CONFIGS, cli
from trd_hpc.data.manifest import load_manifest
from trd_hpc.tasks.cnn3d.example import cnn3d_folder


@pytest.fixture(scope="module")
def family_cohort(tmp_path_factory):
    """40 subjects at 8 sites; families of two inside a site, and one family across sites 0 and 1."""
    src = tmp_path_factory.mktemp("family_src")
    spec = cnn3d_folder(src, n=40)
    table = src / "participants.csv"
    df = pd.read_csv(table, dtype=str)
    i = df["participant_id"].str.removeprefix("sub-").astype(int)
    df["site"] = [f"site{k % 8}" for k in i]
    df["family"] = [f"fam{k % 8}_{k // 16}" for k in i]  # siblings: same site
    df.loc[i.isin([0, 1]), "family"] = "fam_bridge"  # subjects 0 (site0) and 1 (site1) are siblings
    df.to_csv(table, index=False)
    d = yaml.safe_load(spec.read_text())
    d.update({"site_column": "site", "group_columns": ["family"]})
    spec.write_text(yaml.safe_dump(d))
    out = src.parent / (src.name + "_cohort")
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    return spec, out, df


def test_families_and_sites_stay_whole_in_every_split_and_fold(family_cohort):
    _, out, df = family_cohort
    m = load_manifest(out)
    names = m.raw["group_names"]
    assert "site0+site1" in names and "site2" in names and len(names) == 7
    groups = np.asarray(m.raw["groups"])
    for parts in ([m.subjects(s) for s in ("train", "val", "test")], m.folds):
        owner = {}
        for k, ids in enumerate(parts):
            for g in set(groups[ids]):
                assert owner.setdefault(g, k) == k, f"group {names[g]} in parts {owner[g]} and {k}"
    for k in range(len(m.folds)):  # inside each fold's run too
        tr, va = (set(groups[m.subjects(f"fold:{k}:{p}")]) for p in ("train", "val"))
        assert not tr & va
    assert len(m.raw["splits_sha256"]) == 64


def _edited(out: Path, tmp_path: Path, edit) -> Path:
    """A copy of the cohort whose manifest.json ``edit`` changed."""
    import shutil

    dst = tmp_path / "cohort"
    shutil.copytree(out, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _train_error(cohort: Path, tmp_path: Path) -> str:
    r = cli(
        "train", str(CONFIGS / "cnn3d_tiny.yaml"), "--out", str(tmp_path / "run"), f"data.cohort={cohort}",
        "train.max_epochs=1", check=False,
    )  # fmt: skip
    assert r.returncode != 0 and not (tmp_path / "run" / "model.pt").exists(), r.stdout
    return r.stderr.strip().splitlines()[-1]


def test_train_refuses_a_test_split_changed_after_the_cohort_was_made(family_cohort, tmp_path):
    def move(data):
        data["splits"]["train"].append(data["splits"]["test"].pop())

    line = _train_error(_edited(family_cohort[1], tmp_path, move), tmp_path)
    assert "splits_sha256" in line and "changed after the cohort was made" in line, line


def test_train_refuses_test_subjects_among_the_training_ones(family_cohort, tmp_path):
    def overlap(data):
        data["splits"]["train"].append(data["splits"]["test"][0])
        data.pop("splits_sha256")  # an older manifest, or one edited with care

    line = _train_error(_edited(family_cohort[1], tmp_path, overlap), tmp_path)
    assert "'splits.train' and 'splits.test' share 1 subject(s)" in line, line


def test_train_refuses_a_site_across_splits_naming_it(family_cohort, tmp_path):
    out = family_cohort[1]
    m = load_manifest(out)
    groups = np.asarray(m.raw["groups"])
    test = m.subjects("test")
    g = groups[test[0]]
    name = m.raw["group_names"][g]

    def cross(data):  # one subject of a test site moved to train, the fingerprint dropped
        data["splits"]["test"].remove(test[0])
        data["splits"]["train"].append(test[0])
        data.pop("splits_sha256")

    line = _train_error(_edited(out, tmp_path, cross), tmp_path)
    assert f"group {name!r} has subjects in" in line and "train" in line and "test" in line, line
