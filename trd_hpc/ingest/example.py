"""Example folders to ingest, built from real files that come with the libraries: the
example images nibabel ships (``nibabel/tests/data``) and the PLINK filesets bed-reader
ships (``bed_reader/tests/data``).  ``trd-hpc example-data DIR`` writes one; the tests
and ``trd-hpc bench ingest`` use them.

Each builder lays out a BIDS-like folder (``sub-<id>/func|anat/...``), a participants
table in another order than the ``.fam``, with a missing value or two, and a spec; the
images are byte copies (gzip-compressed where the template says .nii.gz) of the packaged
ones, spread over the subjects.  The labels are made up: the folders show the mechanics
of ingest, not a finding.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import bed_reader
import nibabel
import yaml

NIB = Path(nibabel.__file__).parent / "tests" / "data"
BED = Path(bed_reader.__file__).parent / "tests" / "data"
PLINK = BED / "some_missing"  # 100 individuals iid_0..iid_99, 100 variants, missing calls
FUNCTIONAL = (NIB / "functional.nii", NIB / "example4d.nii.gz")  # (17, 21, 3, 20) and (128, 96, 24, 2)
ANATOMICAL = (NIB / "anatomical.nii", NIB / "reoriented_anat_moved.nii")  # (33, 41, 25), (21, 26, 22)


def copy_image(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.name.endswith(".gz") and not src.name.endswith(".gz"):
        with open(src, "rb") as f, gzip.open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
    elif src.name.endswith(".gz") and not dst.name.endswith(".gz"):
        with gzip.open(src, "rb") as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
    else:
        shutil.copyfile(src, dst)


def _write_table(path: Path, header: list[str], rows: list[list]) -> None:
    sep = "\t" if path.suffix == ".tsv" else ","
    path.write_text("\n".join(sep.join(str(v) for v in r) for r in [header, *rows]) + "\n")


def emt_folder(root: Path, n: int = 24, spec_extra: dict | None = None) -> Path:
    """A BIDS-like EMT cohort of ``n`` subjects plus one without genotypes; returns the spec."""
    if not 1 <= n <= 100:
        raise ValueError(f"the example genotypes hold 100 individuals; n={n}")
    root.mkdir(parents=True, exist_ok=True)
    keys = [f"iid_{i}" for i in range(n)] + ["nogeno1"]
    # the table lists subjects in another order than the .fam, ids with and without 'sub-'
    order = sorted(range(len(keys)), key=lambda i: (i * 7) % len(keys))
    rows = []
    for i in order:
        k = keys[i]
        copy_image(FUNCTIONAL[(i // 2) % 2], root / f"sub-{k}" / "func" / f"sub-{k}_task-rest_bold.nii.gz")
        age = "n/a" if i == 3 else 20 + (i * 3) % 40
        hamd = "" if i == 5 else 10 + (i * 5) % 20
        rows.append([f"sub-{k}" if i % 3 else k, "yes" if i % 2 else "no", age, hamd, 1 + i % 9, f"site{i % 3}"])
    _write_table(root / "participants.tsv", ["participant_id", "trd", "age", "hamd", "illness_years", "site"], rows)
    gdir = root / "genotypes"
    gdir.mkdir(exist_ok=True)
    for ext in ("bed", "bim", "fam"):
        shutil.copyfile(f"{PLINK}.{ext}", gdir / f"cohort.{ext}")
    spec = {
        "task": "emt",
        "table": "participants.tsv",
        "id_column": "participant_id",
        "label_column": "trd",
        "labels": ["no", "yes"],
        "clinical_columns": ["age", "hamd", "illness_years"],
        "clinical_missing": "impute",
        "fmri": "sub-{id}/func/sub-{id}_task-rest_bold.nii.gz",
        "genotypes": "genotypes/cohort",
        "snps": {"first": 60},
        "grid": [12, 12, 8],
        "frames": 10,
        "temporal": "resample",
        "on_missing": "drop",
        "subjects_per_shard": 8,
        **(spec_extra or {}),
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cnn3d_folder(root: Path, n: int = 30, spec_extra: dict | None = None) -> Path:
    """A BIDS-like cohort of ``n`` anatomical images with response and severity; returns the spec."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    names = ["non", "partial", "full"]
    for i in reversed(range(n)):
        k = f"{i:02d}"
        copy_image(ANATOMICAL[i % 2], root / f"sub-{k}" / "anat" / f"sub-{k}_T1w.nii")
        cls = i % 3
        severity = {0: 80, 1: 50, 2: 20}[cls] + (i % 5)
        rows.append([f"sub-{k}", names[cls], severity, f"site{i % 5}"])
    _write_table(root / "participants.csv", ["participant_id", "outcome", "madrs", "site"], rows)
    spec = {
        "task": "cnn3d",
        "table": "participants.csv",
        "response_column": "outcome",
        "severity_column": "madrs",
        "labels": ["non", "partial", "full"],
        "severity_max": 100,
        "volume": "sub-{id}/anat/sub-{id}_T1w.nii",
        "grid": [24, 24, 8],
        "subjects_per_shard": 8,
        **(spec_extra or {}),
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
