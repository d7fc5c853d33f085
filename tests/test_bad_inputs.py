"""Bad inputs give clear errors naming the file or key, and change nothing on disk."""

import json

import h5py
import numpy as np
import pytest

from tests.conftest import cli, snapshot
from trd_hpc.data.dataset import CohortDataset
from trd_hpc.data.shards import CohortError


def test_truncated_shard(emt_cohort_copy):
    p = emt_cohort_copy / "shard-00002.h5"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    before = snapshot(emt_cohort_copy)
    r = cli("cohort", "validate", str(emt_cohort_copy), check=False)
    assert r.returncode == 1 and "shard-00002.h5" in r.stderr and "truncated" in r.stderr
    with pytest.raises(CohortError, match="shard-00002.h5"):
        CohortDataset(emt_cohort_copy, "all")
    assert snapshot(emt_cohort_copy) == before


def test_truncated_shard_with_matching_size_claim_fails_on_open(emt_cohort_copy):
    # Truncate and also rewrite the manifest's size, so only opening the file can tell.
    p = emt_cohort_copy / "shard-00001.h5"
    with open(p, "r+b") as f:
        f.truncate(3000)
    man = json.loads((emt_cohort_copy / "manifest.json").read_text())
    man["shards"][1]["bytes"] = 3000
    (emt_cohort_copy / "manifest.json").write_text(json.dumps(man))
    before = snapshot(emt_cohort_copy)
    r = cli("cohort", "validate", str(emt_cohort_copy), check=False)
    assert r.returncode == 1 and "shard-00001.h5" in r.stderr
    ds = CohortDataset(emt_cohort_copy, "all")
    with pytest.raises(CohortError, match="shard-00001.h5"):
        ds.__getitems__([int(np.searchsorted(ds.ids, 20))])
    assert snapshot(emt_cohort_copy) == before


def test_wrong_schema_version(emt_cohort_copy):
    man = json.loads((emt_cohort_copy / "manifest.json").read_text())
    man["schema_version"] = 99
    (emt_cohort_copy / "manifest.json").write_text(json.dumps(man))
    before = snapshot(emt_cohort_copy)
    with pytest.raises(CohortError, match=r"manifest.json: field 'schema_version' is 99"):
        CohortDataset(emt_cohort_copy, "train")
    r = cli("cohort", "validate", str(emt_cohort_copy), check=False)
    assert r.returncode == 1 and "manifest.json" in r.stderr and "schema_version" in r.stderr
    assert snapshot(emt_cohort_copy) == before


def test_wrong_schema_version_inside_a_shard(emt_cohort_copy):
    with h5py.File(emt_cohort_copy / "shard-00003.h5", "r+") as f:
        f.attrs["schema_version"] = 7
    r = cli("cohort", "validate", str(emt_cohort_copy), "--quick", check=False)
    assert r.returncode == 1 and "shard-00003.h5" in r.stderr and "schema_version 7" in r.stderr


def test_manifest_naming_a_missing_shard(emt_cohort_copy):
    man = json.loads((emt_cohort_copy / "manifest.json").read_text())
    man["shards"][0]["file"] = "shard-09999.h5"
    (emt_cohort_copy / "manifest.json").write_text(json.dumps(man))
    before = snapshot(emt_cohort_copy)
    with pytest.raises(CohortError, match="shard-09999.h5.*missing"):
        CohortDataset(emt_cohort_copy, "all")
    r = cli("cohort", "validate", str(emt_cohort_copy), check=False)
    assert r.returncode == 1 and "shard-09999.h5: missing" in r.stderr
    assert snapshot(emt_cohort_copy) == before


def test_wrong_shapes(emt_cohort_copy):
    # Replace a shard's clinical dataset by one with 14 variables.
    p = emt_cohort_copy / "shard-00000.h5"
    with h5py.File(p, "r+") as f:
        data = f["clinical"][:, :14]
        del f["clinical"]
        f.create_dataset("clinical", data=data)
    man = json.loads((emt_cohort_copy / "manifest.json").read_text())
    man["shards"][0]["bytes"] = p.stat().st_size
    (emt_cohort_copy / "manifest.json").write_text(json.dumps(man))
    before = snapshot(emt_cohort_copy)
    r = cli("cohort", "validate", str(emt_cohort_copy), "--quick", check=False)
    assert r.returncode == 1
    assert "shard-00000.h5" in r.stderr and "'clinical' has shape (16, 14), expected (16, 15)" in r.stderr
    ds = CohortDataset(emt_cohort_copy, "all")
    with pytest.raises(CohortError, match="shard-00000.h5.*clinical"):
        ds.__getitems__([0])
    assert snapshot(emt_cohort_copy) == before


def test_missing_manifest_and_directory(tmp_path):
    with pytest.raises(CohortError, match="does not exist"):
        CohortDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="no manifest"):
        CohortDataset(tmp_path / "empty")
    r = cli("cohort", "info", str(tmp_path / "empty"), check=False)
    assert r.returncode == 1 and "manifest.json" in r.stderr
