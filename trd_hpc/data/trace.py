"""What traces a subject back to its sources: the columns a shard keeps beside the data
(``participant_id`` as written in the study's table, the image's ``affine``) that the
loader does not read.  Synthetic and virtual cohorts have none."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def trace(m, ids, name: str) -> dict | None:
    """subject_id -> its row of trace column ``name`` (participant_id, affine), or None when the
    cohort has no such column (synthetic, or regenerated: nothing traced)."""
    import h5py

    if m.virtual:
        return None
    want = set(int(i) for i in ids)
    out: dict = {}
    for s in m.shards:
        first, n = s["first_subject"], s["n_subjects"]
        if not any(first <= i < first + n for i in want):
            continue
        with h5py.File(m.root / s["file"], "r") as f:
            if name not in f:
                return None
            rows = f[name][...]
        for j, p in enumerate(rows):
            if first + j in want:
                out[first + j] = p
    return out


def participant_ids(m, ids: np.ndarray) -> dict[int, str] | None:
    """subject_id -> the id as written in the study's table, for an ingested cohort."""
    got = trace(m, ids, "participant_id")
    return None if got is None else {k: v.decode() for k, v in got.items()}


def subject_labels(cohort: str | Path, ids) -> dict[int, str]:
    """subject_id -> how a figure or table names the subject: its participant id where the
    cohort has one, else ``subject N``."""
    from trd_hpc.data.manifest import load_manifest

    ids = [int(i) for i in ids]
    pids = participant_ids(load_manifest(cohort), np.asarray(ids)) or {}
    return {i: pids.get(i, f"subject {i}") for i in ids}
