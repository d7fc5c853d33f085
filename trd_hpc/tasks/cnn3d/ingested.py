"""The ``ingested_volume`` cohort kind: 3-D images and outcomes for the dual-path CNN.

Shards hold what a synthetic volume shard holds (volume, response, severity, subject_id)
plus the trace columns of ``ingest.kinds``.  The loader treats the volumes as it treats
synthetic ones (paper 001's per-volume z-score then [0, 1], severity / severity_max).
"""

from __future__ import annotations

import numpy as np

from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.errors import IngestError
from trd_hpc.ingest import harmonize as H
from trd_hpc.ingest import table as T
from trd_hpc.ingest.images import fill
from trd_hpc.ingest.kinds import labels_of, manifest_source, splits_of, trace_columns
from trd_hpc.ingest.mapping import IngestMapping, Source
from trd_hpc.ingest.splits import held_out_test_and_folds
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
    from trd_hpc.ingest.resolve import image_reader, subjects

    s = subjects(cfg)
    pid = s.participant_id[index]
    x, affine, source = image_reader(cfg).to_grid(s.image[index], pid, cfg.grid)
    fill(bulk_out, H.subject(cfg, s, index, x))
    severity = s.values["severity"][index] if "severity" in s.values else np.nan
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


# ---------------------------------------------------------------- the ingest spec's meaning
def _table_values(spec, df, tpath) -> dict[str, np.ndarray]:
    if spec.severity_column is None:
        return {}
    severity = T.numbers(df, tpath, spec.severity_column, "severity_column")
    bad = np.flatnonzero((severity < 0) & ~np.isnan(severity))
    if len(bad):
        raise IngestError(f"{tpath}: column '{spec.severity_column}' is negative on line(s) {T.lines(bad)}")
    return {"severity": severity.astype(np.float32)}


def _lacking(spec, values) -> dict[int, list[str]]:
    if spec.response_column is None or "severity" not in values:
        return {}
    return {int(i): [f"no value in '{spec.severity_column}'"] for i in np.flatnonzero(np.isnan(values["severity"]))}


def _resolved_fields(spec, root, subj, sources) -> dict:
    """severity_max: the spec's (no severity above it), or the table's largest; the
    harmonisation's sites and covariates checked (fitted later: harmonize.prepare)."""
    from trd_hpc.ingest.resolve import inside

    h = spec.harmonize
    estimates = inside(root, h.estimates, "harmonize.estimates") if h is not None and h.estimates else None
    H.check(spec, estimates, subj, labelled=spec.response_column is not None)
    severity = subj.values.get("severity")
    smax = spec.severity_max
    if smax is None:
        smax = float(np.nanmax(severity)) if severity is not None and len(severity) else 1.0
        smax = smax if smax > 0 else 1.0
    elif severity is not None and (severity > smax).any():
        i = int(np.flatnonzero(severity > smax)[0])
        raise IngestError(
            f"{root / spec.table}: severity {severity[i]:g} of {subj.participant_id[i]} exceeds severity_max {smax:g}"
        )
    return {"severity_max": smax}


def _example(root, n: int):
    from trd_hpc.tasks.cnn3d.example import cnn3d_folder

    return cnn3d_folder(root, n=n)


INGEST = IngestMapping(
    kind="ingested_volume",
    label_key="response_column",
    n_classes=3,
    image=Source("volume", "image", "nifti"),
    image_ndim=3,
    table_values=_table_values,
    lacking=_lacking,
    resolved_fields=_resolved_fields,
    split=held_out_test_and_folds,
    examples={"bids": _example},
    record=lambda cfg, s: {
        "volume_normalisation": "stored as resampled (then harmonised, when the spec asks); the loader "
        "z-scores then scales to [0, 1] per volume",
        "severity_max": cfg.severity_max,
        **({"harmonization": H.record(cfg)} if cfg.harmonize is not None else {}),
    },
)


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
    ingest=INGEST,
)
