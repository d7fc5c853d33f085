"""The ``ingested_emt`` cohort kind: EMT subjects read from NIfTI, PLINK and a table.

A shard holds what a synthetic EMT shard holds (fmri, snp, clinical, label, subject_id)
plus, per subject, its id as written in the table and the two affines of its image.  The
clinical values are stored as read (NaN where missing); the loader standardises them with
the training split's statistics recorded in the cohort config, a missing value becoming
the mean.
"""

from __future__ import annotations

import numpy as np
import torch

from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.ingest.kinds import labels_of, manifest_source, splits_of, trace_columns
from trd_hpc.tasks.emt.config import IngestedEMTCohort


def _schema(cfg: IngestedEMTCohort) -> list[Column]:
    return [
        Column("fmri", cfg.fmri_shape, cfg.fmri_dtype, True),
        Column("snp", (cfg.n_snps,), "uint8", True),
        Column("clinical", (len(cfg.clinical_columns),), "float32", True),
        Column("label", (), "int64", False),
        Column("subject_id", (), "int64", False),
        *trace_columns(),
    ]


def _make_subject(cfg: IngestedEMTCohort, index: int, bulk_out: np.ndarray) -> dict:
    from trd_hpc.ingest.images import to_grid
    from trd_hpc.ingest.resolve import genotypes_of, subjects

    s = subjects(cfg)
    pid = s.participant_id[index]
    x, affine, source = to_grid(s.image[index], pid, cfg.grid, cfg.frames, cfg.temporal, normalize=True)
    bulk_out[...] = x
    return {
        "snp": genotypes_of(cfg, index),
        "clinical": s.clinical[index],
        "label": np.int64(s.label[index]),
        "participant_id": np.bytes_(pid.encode()),
        "affine": affine,
        "source_affine": source,
    }


def _prepare_batch(cfg: IngestedEMTCohort, out: dict, normalize: bool) -> dict:
    c = out["clinical"]
    mean = torch.tensor(cfg.clinical_mean, dtype=c.dtype)
    sd = torch.tensor(cfg.clinical_sd, dtype=c.dtype)
    out["clinical"] = torch.nan_to_num((c - mean) / sd, nan=0.0)
    return out


def _source_stamps(cfg, first: int, stop: int):
    from trd_hpc.ingest.resolve import source_stamps

    return source_stamps(cfg, first, stop)


KIND = CohortKind(
    name="ingested_emt",
    config_class=IngestedEMTCohort,
    schema=_schema,
    label_column="label",
    class_names=lambda cfg: ["non_trd", "trd"],
    make_subject=_make_subject,
    predicted_labels=labels_of,
    make_splits=splits_of,
    class_count_problem=lambda cfg, counts: None,  # real cohorts are as balanced as they are
    generated=False,
    manifest_extras=manifest_source,
    source_stamp=lambda cfg, first, stop: _source_stamps(cfg, first, stop),
    prepare_batch=_prepare_batch,
)
