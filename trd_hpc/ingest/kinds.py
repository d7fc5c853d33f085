"""What the ingested cohort kinds of every paper share: the trace columns of a shard and
the labels, splits and manifest record read from the resolved sources (trd_hpc.ingest.resolve).
"""

from __future__ import annotations

import numpy as np

from trd_hpc.data.kinds import Column

# The kind registry imports this module whenever any cohort is used; what reads the sources
# (pandas, nibabel, bed-reader) is imported when an ingested cohort is actually written.

ID_BYTES = 64  # participant ids are stored as fixed-width bytes


def trace_columns() -> list[Column]:
    """Columns that trace a row back to its sources; the loader does not read them."""
    return [
        Column("participant_id", (), f"S{ID_BYTES}", False, load=False),
        Column("affine", (4, 4), "float64", False, load=False),
        Column("source_affine", (4, 4), "float64", False, load=False),
    ]


def labels_of(cfg) -> np.ndarray:
    from trd_hpc.ingest.resolve import subjects

    return subjects(cfg).label.copy()


def splits_of(cfg, labels: np.ndarray):
    from trd_hpc.ingest.resolve import subjects
    from trd_hpc.ingest.splits import splits_for

    return splits_for(cfg, labels, subjects(cfg).site)


def manifest_source(cfg) -> dict:
    from trd_hpc.ingest.resolve import source_record

    return source_record(cfg)
