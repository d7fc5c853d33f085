"""The ``ingested_emt`` cohort kind: EMT subjects read from NIfTI, PLINK and a table.

A shard holds what a synthetic EMT shard holds (fmri, snp, clinical, label, subject_id)
plus, per subject, its id as written in the table and the two affines of its image.  The
clinical values are stored as read (NaN where missing); the loader standardises them with
the training split's statistics recorded in the cohort config, a missing value becoming
the mean.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.errors import IngestError
from trd_hpc.ingest import table as T
from trd_hpc.ingest.images import fill
from trd_hpc.ingest.kinds import labels_of, manifest_source, splits_of, trace_columns
from trd_hpc.ingest.mapping import IngestMapping, Source
from trd_hpc.ingest.splits import three_way
from trd_hpc.tasks.emt.config import MODALITIES, IngestedEMTCohort


def _schema(cfg: IngestedEMTCohort) -> list[Column]:
    return [
        Column("fmri", cfg.fmri_shape, cfg.fmri_dtype, True),
        *([Column("snp", (cfg.n_snps,), "uint8", True)] if cfg.genotypes is not None else []),  # none: no column
        Column("clinical", (len(cfg.clinical_columns),), "float32", True),
        Column("label", (), "int64", False),
        Column("subject_id", (), "int64", False),
        *([Column("present", (len(MODALITIES),), "uint8", True, high=2)] if cfg.on_missing == "keep" else []),
        *trace_columns(),
    ]


def _make_subject(cfg: IngestedEMTCohort, index: int, bulk_out: np.ndarray) -> dict:
    from trd_hpc.ingest.resolve import image_reader, source_matrix, subjects

    s = subjects(cfg)
    pid = s.participant_id[index]
    present = s.present[index] if s.present is not None else None
    if present is not None and not present[0]:  # kept without its fMRI: zeros, marked absent
        x, affine, source = np.zeros(cfg.fmri_shape, dtype=np.float32), np.eye(4), np.eye(4)
    elif cfg.atlas is not None:
        x, affine, source = _regions_of(cfg, s, index, pid)
    else:
        extra = _derivative_steps(cfg, s, index, pid)
        x, affine, source = image_reader(cfg).to_grid(
            s.image[index], pid, cfg.grid, cfg.frames, cfg.temporal, normalize=True, **extra
        )
    fill(bulk_out, x)
    return {
        **({"snp": source_matrix(cfg, "genotypes")[index]} if cfg.genotypes is not None else {}),
        "clinical": s.values["clinical"][index],
        **({"present": present} if present is not None else {}),
        "label": np.int64(s.label[index]),
        "participant_id": np.bytes_(pid.encode()),
        "affine": affine,
        "source_affine": source,
    }


def _derivative_steps(cfg: IngestedEMTCohort, s, index: int, pid: str) -> dict:
    """An image from a derivatives folder: its pipeline's brain mask, and the confound
    regression the spec asks for (trd_hpc.ingest.confounds)."""
    out: dict = {}
    mask = s.sidecars.get("mask", [None] * (index + 1))[index]
    if mask is not None:
        out["mask_path"] = mask
    if cfg.confounds is not None:
        from trd_hpc.ingest import confounds as C

        path = s.sidecars["confounds"][index]
        table, _ = C.read(path, C.columns(cfg.confounds.strategy), pid)
        t_r = cfg.confounds.t_r or C.repetition_time(s.image[index])

        def clean(series, grid_mask):
            rows = table[: series.shape[3]] if cfg.temporal == "crop" else table
            return C.clean(series, grid_mask, rows, cfg.confounds, t_r)

        out["clean"] = clean
    return out


def _regions_of(cfg: IngestedEMTCohort, s, index: int, pid: str):
    """(regions x frames, identity, the image's affine) through the atlas (trd_hpc.ingest.atlas)."""
    from trd_hpc.ingest import atlas as A
    from trd_hpc.ingest.images import to_frames
    from trd_hpc.ingest.resolve import image_reader, inside

    root = Path(cfg.resolved.root)
    path = inside(root, cfg.atlas.image, "atlas.image")
    kind = "maps" if len(_atlas_shape(str(path))) == 4 and _atlas_shape(str(path))[3] > 1 else "labels"
    table = t_r = None
    if cfg.confounds is not None:
        from trd_hpc.ingest import confounds as C

        table, _ = C.read(s.sidecars["confounds"][index], C.columns(cfg.confounds.strategy), pid)
        t_r = cfg.confounds.t_r or C.repetition_time(s.image[index])
    series = A.region_series(s.image[index], pid, path, kind, cfg.region_labels, table, cfg.confounds, t_r)
    if series.shape[1] < cfg.frames and cfg.temporal == "crop":
        raise IngestError(f"subject {pid}: {s.image[index]}: {series.shape[1]} frames, the spec keeps {cfg.frames}")
    series = to_frames(series, cfg.frames, cfg.temporal)
    source = image_reader(cfg).header(s.image[index], pid, 4).affine
    return series, np.eye(4), source


@lru_cache(maxsize=4)
def _atlas_shape(path: str) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(nib.load(path).shape)


def _check_sources(spec, subj) -> None:
    if spec.confounds is None:
        return
    from trd_hpc.ingest import confounds as C

    C.check_files(
        subj.sidecars["confounds"],
        subj.participant_id,
        C.columns(spec.confounds.strategy),
        spec.frames if spec.temporal == "crop" else None,
    )


def _prepare_batch(cfg: IngestedEMTCohort, out: dict, normalize: bool) -> dict:
    c = out["clinical"]
    mean = torch.tensor(cfg.clinical_mean, dtype=c.dtype)
    sd = torch.tensor(cfg.clinical_sd, dtype=c.dtype)
    out["clinical"] = torch.nan_to_num((c - mean) / sd, nan=0.0)
    return out


def _source_stamps(cfg, first: int, stop: int):
    from trd_hpc.ingest.resolve import source_stamps

    return source_stamps(cfg, first, stop)


# ---------------------------------------------------------------- the ingest spec's meaning
def _table_values(spec, df, tpath) -> dict[str, np.ndarray]:
    clinical = [T.numbers(df, tpath, c, "clinical_columns") for c in spec.clinical_columns]
    return {"clinical": np.stack(clinical, axis=1).astype(np.float32)}


def _no_clinical(spec, values) -> dict[int, set[str]]:
    """Rows whose clinical columns are all empty: under on_missing: keep, clinical is absent for
    them (present 0, the EMT's missing token), rather than every value imputed as if observed."""
    c = values.get("clinical")
    if c is None or not c.shape[1]:
        return {}
    return {int(i): {"clinical"} for i in np.flatnonzero(np.isnan(c).all(axis=1))}


def _check_clinical(spec, tpath, values, keep) -> None:
    if spec.clinical_missing != "error":
        return
    clinical = values["clinical"]
    if spec.on_missing == "keep":  # a row with no clinical value at all is kept with clinical absent
        keep = keep[~np.isnan(clinical[keep]).all(axis=1)]
    holes = [
        f"'{c}' on line(s) {T.lines(keep[np.isnan(clinical[keep, j])])}"
        for j, c in enumerate(spec.clinical_columns)
        if np.isnan(clinical[keep, j]).any()
    ]
    if holes:
        raise IngestError(
            f"{tpath}: missing clinical values: {'; '.join(holes)}. Fill them, or set clinical_missing: impute "
            f"(the training split's mean, recorded in the manifest)"
        )


def _clinical_stats(spec, subj) -> tuple[list[float], list[float]]:
    """Mean and sd of each clinical column over the training split (all subjects of an
    unlabelled cohort, which has none); what the model sees is (x - mean) / sd."""
    x = subj.values["clinical"].astype(np.float64)
    if spec.label_column is not None:
        from trd_hpc.ingest.splits import splits_for

        train = np.asarray(splits_for(spec, subj.label, subj.site)[0]["train"], dtype=np.int64)
        x = x[train]
    mean = np.nanmean(x, axis=0) if len(x) else np.zeros(x.shape[1])
    sd = np.nanstd(x, axis=0) if len(x) else np.ones(x.shape[1])
    bad = [c for c, m in zip(spec.clinical_columns, mean) if not np.isfinite(m)]
    if bad:
        raise IngestError(f"clinical column(s) {', '.join(bad)} have no value in the training split")
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)  # a constant column stays 0 after centring
    return [float(v) for v in mean], [float(v) for v in sd]


def _candidates(spec, root, geno) -> list[str]:
    from trd_hpc.ingest.resolve import inside

    ids_file = inside(root, spec.snps.ids, "snps.ids") if spec.snps.ids else None
    return geno.select(spec.snps.first, ids_file)


def _check_selection(spec, root, sources) -> None:
    """The variants snps: names exist in the fileset (read before anything else fails)."""
    if spec.genotypes is None:
        return
    geno = sources["genotypes"]
    geno.check(_candidates(spec, root, geno))


def _screen(spec, root, sources, rows, kept) -> dict[int, list[str]]:
    """snps.mind: subjects missing more than that fraction of the candidate variants' calls."""
    if spec.snps.mind is None or spec.genotypes is None:
        return {}
    from trd_hpc.ingest.genotype_qc import subject_missingness

    geno = sources["genotypes"]
    kept = kept[rows["genotypes"][kept] >= 0]  # those without genotypes (on_missing: keep) have no call rate
    rate = subject_missingness(geno, rows["genotypes"][kept], _candidates(spec, root, geno))
    return {
        int(i): [f"genotype missingness {r:.3f} > snps.mind {spec.snps.mind:g}"]
        for i, r in zip(kept, rate)
        if r > spec.snps.mind
    }


def _variant_qc(spec, subj, geno, snp_ids: list[str]) -> tuple[list[str], dict]:
    """snps.geno / hwe / maf on the training split's subjects (trd_hpc.ingest.genotype_qc)."""
    from trd_hpc.ingest.genotype_qc import filter_variants
    from trd_hpc.ingest.splits import splits_for

    if spec.label_column is None:
        raise IngestError(
            "snps.geno / hwe / maf are fitted on the training split, and an unlabelled cohort has none: "
            "name the model's variants with snps.ids instead (its bundle's schema.json lists them)"
        )
    train = np.asarray(splits_for(spec, subj.label, subj.site)[0]["train"], dtype=np.int64)
    rows = subj.rows["genotypes"][train]
    kept, table = filter_variants(geno, rows[rows >= 0], snp_ids, spec.snps)
    if not kept:
        raise IngestError(
            f"snps: the quality filters removed all {len(snp_ids)} candidate variants ({table['removed']})"
        )
    table["mind"] = spec.snps.mind
    table["fitted_on"] = "train"
    return kept, table


def _resolved_fields(spec, root, subj, sources) -> dict:
    from trd_hpc.ingest.resolve import inside

    snp_ids, qc = [], None  # a spec without genotypes: no variants
    if spec.genotypes is not None:
        geno = sources["genotypes"]
        snp_ids = _candidates(spec, root, geno)
        geno.check(snp_ids)
        if spec.snps.variant_filters:
            snp_ids, qc = _variant_qc(spec, subj, geno, snp_ids)
    mean, sd = _clinical_stats(spec, subj)
    out = {"snp_ids": snp_ids, "clinical_mean": mean, "clinical_sd": sd, "snp_qc": qc}
    if spec.atlas is not None:
        from trd_hpc.ingest.atlas import describe

        labels = inside(root, spec.atlas.labels, "atlas.labels") if spec.atlas.labels else None
        _, values, names, sha = describe(inside(root, spec.atlas.image, "atlas.image"), labels)
        out.update({"region_names": names, "region_labels": values, "atlas_sha256": sha})
    return out


def _record(cfg, s) -> dict:
    clinical = s.values["clinical"]
    observed = (
        np.ones(len(clinical), dtype=bool) if s.present is None else s.present[:, MODALITIES.index("clinical")] == 1
    )
    rec = {"confounds": _confounds_record(cfg)} if cfg.confounds is not None else {}
    if cfg.atlas is not None:
        rec["atlas"] = {
            **cfg.atlas.model_dump(mode="json"),
            "regions": cfg.region_names,
            "sha256": cfg.atlas_sha256,
            "method": "nilearn.maskers NiftiLabelsMasker (NiftiMapsMasker for a 4-D atlas), the atlas resampled "
            "onto each image; each region's series z-scored over time unless confounds: says otherwise",
        }
    return {
        **rec,
        "frames": cfg.frames,
        "temporal": cfg.temporal,
        "fmri_normalisation": "z-score over brain voxels and frames per subject, background 0",
        **_genotypes_record(cfg),
        "clinical": {
            "columns": cfg.clinical_columns,
            "mean": cfg.clinical_mean,
            "sd": cfg.clinical_sd,
            "fitted_on": "train" if cfg.labelled else "all subjects (unlabelled cohort)",
            "missing": cfg.clinical_missing,
            # cells filled with the mean, among subjects with clinical values (the others: absent)
            "imputed": {
                c: int(np.isnan(clinical[observed, j]).sum())
                for j, c in enumerate(cfg.clinical_columns)
                if np.isnan(clinical[observed, j]).any()
            },
            "absent": int((~observed).sum()),  # on_missing: keep, no clinical value at all: present 0
        },
    }


def _genotypes_record(cfg) -> dict:
    if cfg.genotypes is None:
        return {"genotypes": "absent: the spec names none; the model has no SNP branch", "snp_ids": []}
    from trd_hpc.ingest.resolve import source_matrix

    return {
        "genotypes": cfg.genotypes,
        "genotype_coding": "count of the A1 allele 0/1/2; 3 = missing call",
        "missing_calls": int((source_matrix(cfg, "genotypes") == 3).sum()),
        "snp_ids": cfg.snp_ids,
        "snp_qc": cfg.snp_qc,
    }


def _example(root, n: int):
    from trd_hpc.tasks.emt.example import emt_folder

    return emt_folder(root, n=n)


def _fmriprep_example(root, n: int):
    from trd_hpc.tasks.emt.example import fmriprep_folder

    return fmriprep_folder(root, n=n)


def _fmriprep_atlas_example(root, n: int):
    from trd_hpc.tasks.emt.example import fmriprep_folder

    return fmriprep_folder(root, n=n, atlas=True)


def _confounds_record(cfg) -> dict:
    from trd_hpc.ingest.confounds import columns

    c = cfg.confounds
    return {
        "method": "nilearn.signal.clean on the grid, after spatial resampling, before the temporal step",
        "columns": columns(c.strategy),
        "strategy": c.strategy,
        "detrend": c.detrend,
        "standardize": c.standardize,
        "high_pass": c.high_pass,
        "low_pass": c.low_pass,
        "t_r": c.t_r or "the images' JSON sidecar (RepetitionTime), else their header",
    }


INGEST = IngestMapping(
    kind="ingested_emt",
    label_key="label_column",
    n_classes=2,
    image=Source("fmri", "image", "nifti", sidecars=("mask", "confounds")),
    modalities=MODALITIES,
    image_ndim=4,
    cohort_sources=(Source("genotypes", "genotypes", "plink1", fingerprint_field="genotypes_sha256"),),
    min_frames=lambda spec: spec.frames if spec.temporal == "crop" else None,
    table_values=_table_values,
    absent_values=_no_clinical,
    check=_check_clinical,
    check_sources=_check_sources,
    screen=_screen,
    check_selection=_check_selection,
    resolved_fields=_resolved_fields,
    split=three_way,
    examples={"bids": _example, "fmriprep": _fmriprep_example, "fmriprep_atlas": _fmriprep_atlas_example},
    record=_record,
)


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
    ingest=INGEST,
    modalities=MODALITIES,
)
