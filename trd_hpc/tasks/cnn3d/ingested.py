"""The ``ingested_volume`` cohort kind: 3-D images and outcomes for the dual-path CNN.

Shards hold what a synthetic volume shard holds (volume, response, severity, subject_id)
plus the trace columns of ``ingest.kinds``.  The loader treats the volumes as it treats
synthetic ones (paper 001's per-volume z-score then [0, 1], severity / severity_max).
"""

from __future__ import annotations

import numpy as np

from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.ingest.kinds import labels_of, manifest_source, splits_of, trace_columns
from trd_hpc.tasks.cnn3d.cohort import KIND as SYNTHETIC
from trd_hpc.tasks.cnn3d.config import IngestedVolumeCohort


def _schema(cfg: IngestedVolumeCohort) -> list[Column]:
    return [
        Column("volume", cfg.shape, "float32", True),
        Column("response", (), "int64", False),
        Column("severity", (), "float32", False),
        Column("subject_id", (), "int64", False),
        *trace_columns(),
    ]


def _make_subject(cfg: IngestedVolumeCohort, index: int, bulk_out: np.ndarray) -> dict:
    from trd_hpc.ingest.images import to_grid
    from trd_hpc.ingest.resolve import subjects

    s = subjects(cfg)
    pid = s.participant_id[index]
    x, affine, source = to_grid(s.image[index], pid, cfg.grid)
    bulk_out[...] = x
    severity = s.severity[index] if s.severity is not None else np.nan
    return {
        "response": np.int64(s.label[index]),
        "severity": np.float32(severity),
        "participant_id": np.bytes_(pid.encode()),
        "affine": affine,
        "source_affine": source,
    }


def _source_stamps(cfg, first: int, stop: int):
    from trd_hpc.ingest.resolve import source_stamps

    return source_stamps(cfg, first, stop)


KIND = CohortKind(
    name="ingested_volume",
    config_class=IngestedVolumeCohort,
    schema=_schema,
    label_column="response",
    class_names=lambda cfg: list(cfg.class_names),
    make_subject=_make_subject,
    predicted_labels=labels_of,
    make_splits=splits_of,
    class_count_problem=lambda cfg, counts: None,
    generated=False,
    manifest_extras=manifest_source,
    source_stamp=lambda cfg, first, stop: _source_stamps(cfg, first, stop),
    prepare_batch=SYNTHETIC.prepare_batch,
)
