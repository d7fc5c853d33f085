"""The example folder of paper 000 to ingest (``trd-hpc example-data DIR --task emt``): real
files that come with nibabel and bed-reader laid out as a study would (trd_hpc.ingest.example)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from trd_hpc.ingest.example import FUNCTIONAL, PLINK, copy_image, write_table


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
    write_table(root / "participants.tsv", ["participant_id", "trd", "age", "hamd", "illness_years", "site"], rows)
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
