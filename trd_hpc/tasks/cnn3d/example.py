"""The example folder of paper 001 to ingest (``trd-hpc example-data DIR --task cnn3d``): real
files that come with nibabel and bed-reader laid out as a study would (trd_hpc.ingest.example)."""

from __future__ import annotations

from pathlib import Path

import yaml

from trd_hpc.ingest.example import ANATOMICAL, copy_image, write_table


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
    write_table(root / "participants.csv", ["participant_id", "outcome", "madrs", "site"], rows)
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
