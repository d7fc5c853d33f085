"""The ingest reader registry: a format of your own (tests/npz_reader.py, a plugin) ingests the
same subjects as the built-in NIfTI reader, bit for bit; a format or source key that does not
exist is a one-line error naming the spec key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import yaml

from tests.conftest import REPO, cli
from trd_hpc.tasks.cnn3d.example import cnn3d_folder

PLUGIN = {"TRD_HPC_PLUGINS": "tests.npz_reader"}


def _arrays(out: Path) -> dict[str, np.ndarray]:
    got: dict[str, list] = {}
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for k in ("volume", "affine", "source_affine", "participant_id", "response"):
                got.setdefault(k, []).append(f[k][...])
    return {k: np.concatenate(v) for k, v in got.items()}


def _as_npz(spec: Path) -> Path:
    """The folder's images as .npz files beside them (the .nii removed), and the spec naming them."""
    root = spec.parent
    for nii in root.glob("sub-*/anat/*.nii"):
        img = nib.load(str(nii))
        np.savez(nii.with_suffix(".npz"), data=np.asarray(img.dataobj, dtype=np.float32), affine=img.affine)
        nii.unlink()
    d = yaml.safe_load(spec.read_text())
    d["volume"] = d["volume"].replace(".nii", ".npz")
    d["formats"] = {"volume": "npz", "table": "csv"}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    return spec


def test_a_reader_of_your_own_ingests_what_the_nifti_reader_does(tmp_path):
    nifti = cnn3d_folder(tmp_path / "nifti", n=30)
    npz = _as_npz(cnn3d_folder(tmp_path / "npz", n=30))
    cli("ingest", str(nifti), "--out", str(tmp_path / "a"), "--quiet")
    cli("ingest", str(npz), "--out", str(tmp_path / "b"), "--quiet", env=PLUGIN)
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    assert len(a["volume"]) == 30 and a["volume"].std() > 0
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    source = json.loads((tmp_path / "b" / "manifest.json").read_text())["source"]
    assert source["formats"] == {"volume": "npz"}
    assert source["images"].startswith("NumPy .npz")
    # the shard writers (spawned processes) and validate find the plugin's reader by name too
    r = cli("cohort", "validate", str(tmp_path / "b"), env=PLUGIN)
    assert "ok" in r.stdout.lower(), r.stdout


def test_a_format_that_has_no_reader_is_named_with_the_formats_there_are(tmp_path):
    npz = _as_npz(cnn3d_folder(tmp_path / "npz", n=30))
    r = cli("ingest", str(npz), "--out", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and not (tmp_path / "out").exists()
    line = r.stderr.strip().splitlines()[-1]
    assert "formats.volume" in line and "'npz'" in line and "nifti" in line, r.stderr


def test_formats_naming_a_source_the_spec_has_not_is_refused(tmp_path):
    spec = cnn3d_folder(tmp_path / "src", n=30)
    d = yaml.safe_load(spec.read_text())
    d["formats"] = {"genotypes": "plink1"}  # a CNN spec has no genotypes
    spec.write_text(yaml.safe_dump(d))
    r = cli("ingest", str(spec), "--out", str(tmp_path / "out"), check=False)
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "'formats'" in line and "'genotypes'" in line and "volume" in line, r.stderr


def test_the_test_format_is_named_nowhere_in_the_package():
    hits = subprocess.run(
        ["grep", "-rlnw", "--exclude-dir=__pycache__", "npz_reader\\|NpzReader", str(REPO / "trd_hpc")],
        capture_output=True,
        text=True,
    )
    assert hits.stdout == "", hits.stdout
