"""Example folders to ingest, built from real files that come with the libraries: the
example images nibabel ships (``nibabel/tests/data``) and the PLINK filesets bed-reader
ships (``bed_reader/tests/data``).  ``trd-hpc example-data DIR --task T`` writes one; the
tests and ``trd-hpc bench ingest`` use them.  Each paper's builder is in its folder
(``trd_hpc/tasks/<paper>/example.py``, its ``IngestMapping.example``); these are the parts
they share.

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


def write_table(path: Path, header: list[str], rows: list[list]) -> None:
    sep = "\t" if path.suffix == ".tsv" else ","
    path.write_text("\n".join(sep.join(str(v) for v in r) for r in [header, *rows]) + "\n")
