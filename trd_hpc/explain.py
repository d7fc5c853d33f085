"""What ``trd-hpc predict --explain`` shares across tasks: NIfTI maps and summary rows.

Each paper's attribution method lives with its task (``trd_hpc/tasks/<paper>/explain.py``,
called by its ``TaskSpec.explain``): Integrated Gradients for the EMT, Grad-CAM for the CNN.
Maps are written as NIfTI with the subject's grid affine (an ingested cohort's ``affine``
dataset: its world space) or the identity (synthetic cohorts), so they open in any
viewer; one summary row per subject names the top regions (the cohort's region boxes:
the designed ones, or the grid's octants for a real cohort), SNPs and clinical variables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def top_scores(names: list[str], scores: np.ndarray, k: int = 3) -> str:
    order = np.argsort(-np.abs(scores), kind="stable")[:k]
    return ";".join(f"{names[i]}:{scores[i]:+.3g}" for i in order)


def region_scores(vol: np.ndarray, boxes: dict) -> dict[str, float]:
    """Mean |attribution| inside each region box."""
    return {n: float(np.abs(vol[x0:x1, y0:y1, z0:z1]).mean()) for n, ((x0, x1), (y0, y1), (z0, z1)) in boxes.items()}


def write_map(path: Path, vol: np.ndarray, affine: np.ndarray | None) -> None:
    import nibabel as nib

    from trd_hpc.fsio import atomic_path

    with atomic_path(path) as tmp:
        nib.save(
            nib.Nifti1Image(np.asarray(vol, dtype=np.float32), np.eye(4) if affine is None else affine),
            str(tmp) + ".nii.gz",
        )
        Path(str(tmp) + ".nii.gz").rename(tmp)
