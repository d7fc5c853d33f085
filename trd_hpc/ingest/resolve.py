"""An ingest spec checked against its files: the cohort config, and each subject's sources.

``resolve(SPEC.yaml)`` reads the table, matches its ids to the images (by the path
template) and to the genotypes (by IID), reads every image's header, and decides which
subjects the cohort holds (``on_missing``).  Every problem found is reported together,
before any shard is written.  ``subjects(cfg)`` rebuilds the same subject list from a
resolved config (in each process that writes shards) and refuses a table that changed
since.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from trd_hpc.cohort_config import Resolved
from trd_hpc.config import format_validation_error, ingest_spec_class, ingest_tasks, validate_cohort
from trd_hpc.errors import ConfigError, IngestError
from trd_hpc.ingest import table as T


@dataclass
class Subjects:
    """The cohort's subjects in table order, after any dropped."""

    participant_id: list[str]  # as written in the table
    key: list[str]  # the BIDS label ('01' for 'sub-01')
    image: list[Path]
    label: np.ndarray  # int64, -1 when unlabelled
    severity: np.ndarray | None  # float32 (cnn3d)
    clinical: np.ndarray | None  # float32 [n, k], NaN where missing (emt)
    genotype_row: np.ndarray | None  # row in the .fam (emt)
    site: list[str] | None
    dropped: list[dict[str, str]]


def load_spec(path: str | Path):
    """The validated spec of ``path`` (ConfigError naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ingest spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an ingest spec is a mapping of keys")
    task = data.get("task")
    cls = ingest_spec_class(task) if isinstance(task, str) else None
    if cls is None:
        raise ConfigError(f"{path}: key 'task' must be one of {ingest_tasks()}, got {task!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls, str(path), "ingest spec")) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel: str | Path, spec_key: str) -> Path:
    """``root/rel``, refused unless it stays inside the study folder ``root``.

    A spec is a file others hand you: with ``../`` or an absolute path it could make ingest
    read (and echo into errors and manifests) any file on the machine.  The check is on the
    path as written (normalised, links not followed): a link the folder's owner put inside
    the folder is theirs to make."""
    root = Path(os.path.abspath(root))
    p = Path(os.path.normpath(root / rel))
    if p != root and root not in p.parents:
        raise ConfigError(
            f"spec key '{spec_key}': {rel} is outside the study folder {root}; paths in a spec are relative to the "
            "spec's own folder and stay inside it (link the file into the folder to use it)"
        )
    return p


def _image_path(root: Path, template: str, key: str, spec_key: str) -> Path:
    if "{id}" not in template:
        raise ConfigError(
            f"spec key '{spec_key}': template {template!r} has no {{id}}: every subject would get the same image"
        )
    try:
        rel = template.format(id=key)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"spec key '{spec_key}': template {template!r} takes only {{id}} ({e})") from None
    return inside(root, rel, spec_key)


def _table_values(spec, df, tpath: Path, emt: bool, n: int, label_col: str | None):
    """(label, severity, clinical, site) read from the table's columns the spec names."""
    if label_col is not None:
        label = T.class_labels(
            df, tpath, label_col, spec.labels, 2 if emt else 3, "label_column" if emt else "response_column"
        )
    else:
        label = np.full(n, -1, dtype=np.int64)
    severity = None
    if not emt and spec.severity_column is not None:
        severity = T.numbers(df, tpath, spec.severity_column, "severity_column")
        bad = np.flatnonzero((severity < 0) & ~np.isnan(severity))
        if len(bad):
            raise IngestError(f"{tpath}: column '{spec.severity_column}' is negative on line(s) {T.lines(bad)}")
    clinical = None
    if emt:
        clinical = np.stack(
            [T.numbers(df, tpath, c, "clinical_columns") for c in spec.clinical_columns], axis=1
        ).astype(np.float32)
    site = None
    if spec.site_column is not None:
        col = T.column(df, tpath, spec.site_column, "site_column")
        if col.isna().any():
            raise IngestError(
                f"{tpath}: column '{spec.site_column}' is empty on line(s) {T.lines(col.index[col.isna()])}"
            )
        site = [str(v).strip() for v in col]
    return label, severity, clinical, site


def _lacking(spec, root: Path, emt: bool, keys, images, tkey, label, label_col, severity):
    """({row: what the subject lacks}, genotype rows or None): only a missing source may be
    dropped (on_missing: drop)."""
    lacks: dict[int, list[str]] = {}
    geno_row = None
    if emt:
        from trd_hpc.ingest.genotypes import Genotypes

        geno = Genotypes(inside(root, spec.genotypes, "genotypes"))
        geno_row = np.array([geno.row.get(k, -1) for k in keys], dtype=np.int64)
        for i in np.flatnonzero(geno_row < 0):
            lacks.setdefault(int(i), []).append(f"no genotypes (IID not in {geno.files['fam'].name})")
    for i, p in enumerate(images):
        if not p.is_file():
            lacks.setdefault(i, []).append(f"no {tkey} image ({p})")
    if label_col is not None:
        for i in np.flatnonzero(label < 0):
            lacks.setdefault(int(i), []).append(f"no value in '{label_col}'")
        if severity is not None:
            for i in np.flatnonzero(np.isnan(severity)):
                lacks.setdefault(int(i), []).append(f"no value in '{spec.severity_column}'")
    return lacks, geno_row


def _check_headers(spec, emt: bool, images, written, keep) -> None:
    """Headers of the kept images: a file nibabel cannot read, or of the wrong kind, is an
    error whatever on_missing says (it is there, so it was meant to be used)."""
    from trd_hpc.ingest.images import read_header

    problems = []
    for i in keep:
        try:
            read_header(
                images[i], written[i], 4 if emt else 3, spec.frames if emt and spec.temporal == "crop" else None
            )
        except IngestError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IngestError("; ".join(problems[:5]) + more)


def _check_clinical(spec, tpath: Path, clinical, keep) -> None:
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


def _collect(spec, root: Path, headers: bool = True) -> Subjects:
    """Every row of the table with its sources; raises on what no policy can mend.

    ``headers``: read every kept image's header too (``resolve``; a worker that rebuilds
    the list skips it: each image it writes is read whole anyway, and errors name it)."""
    tpath = inside(root, spec.table, "table")
    df = T.read_table(tpath)
    written, keys = T.ids(df, tpath, spec.id_column)
    n = len(keys)
    emt = spec.task == "emt"
    template, tkey = (spec.fmri, "fmri") if emt else (spec.volume, "volume")
    images = [_image_path(root, template, k, tkey) for k in keys]
    label_col = spec.label_column if emt else spec.response_column
    label, severity, clinical, site = _table_values(spec, df, tpath, emt, n, label_col)
    lacks, geno_row = _lacking(spec, root, emt, keys, images, tkey, label, label_col, severity)

    if lacks and spec.on_missing == "error":
        listed = "; ".join(f"{written[i]} (line {i + 2}): {', '.join(w)}" for i, w in sorted(lacks.items())[:10])
        more = f"; and {len(lacks) - 10} more" if len(lacks) > 10 else ""
        raise IngestError(
            f"{tpath}: {len(lacks)} subject(s) lack a source: {listed}{more}. Fix them, or set on_missing: drop "
            f"in the spec to leave them out (they are then listed in the manifest)"
        )
    long_ids = [f"{w} (line {i + 2})" for i, w in enumerate(written) if len(w.encode()) > 64]
    if long_ids:
        raise IngestError(f"{tpath}: ids longer than 64 bytes: {', '.join(long_ids[:5])}")
    keep = np.array([i for i in range(n) if i not in lacks], dtype=np.int64)
    dropped = [{"participant_id": written[i], "reason": ", ".join(w)} for i, w in sorted(lacks.items())]
    if not len(keep):
        raise IngestError(f"{tpath}: no subject has every source the spec names")
    if label_col is not None:
        _check_classes(tpath, label_col, label[keep], spec.labels, 2 if emt else 3)
    if headers:
        _check_headers(spec, emt, images, written, keep)
    if clinical is not None and spec.clinical_missing == "error":
        _check_clinical(spec, tpath, clinical, keep)
    return Subjects(
        participant_id=[written[i] for i in keep],
        key=[keys[i] for i in keep],
        image=[images[i] for i in keep],
        label=label[keep],
        severity=None if severity is None else severity[keep].astype(np.float32),
        clinical=None if clinical is None else clinical[keep],
        genotype_row=None if geno_row is None else geno_row[keep],
        site=None if site is None else [site[i] for i in keep],
        dropped=dropped,
    )


def _check_classes(tpath: Path, col: str, labels: np.ndarray, names, n_classes: int) -> None:
    """Every class among the kept, labelled subjects: a cohort of one class trains a model
    that has learned nothing (and crashed training); a class with no subject has no metric."""
    counts = np.bincount(labels[labels >= 0], minlength=n_classes)
    if (counts == 0).any():
        shown = [str(v) for v in names] if names is not None else [str(k) for k in range(n_classes)]
        have = ", ".join(f"{shown[k]}: {int(c)}" for k, c in enumerate(counts))
        raise IngestError(
            f"{tpath}: column '{col}': the kept subjects hold no subject of class(es) "
            f"{', '.join(shown[k] for k in np.flatnonzero(counts == 0))} ({have}); a model needs subjects of every "
            "class (leave the label column out of the spec to ingest an unlabelled cohort for prediction)"
        )


def resolve(path: str | Path):
    """The cohort config of the spec at ``path`` (kind ingested_emt / ingested_volume)."""
    path = Path(path).resolve()
    spec = load_spec(path)
    root = path.parent
    subj = _collect(spec, root)
    resolved = Resolved(
        root=str(root),
        table_sha256=_sha256(inside(root, spec.table, "table")),
        n_subjects=len(subj.key),
        dropped=subj.dropped,
    )
    d = spec.model_dump(mode="json")
    if spec.task == "emt":
        from trd_hpc.ingest.genotypes import Genotypes

        geno = Genotypes(inside(root, spec.genotypes, "genotypes"))
        snp_ids = geno.select(spec.snps.first, inside(root, spec.snps.ids, "snps.ids") if spec.snps.ids else None)
        geno.check_padding(snp_ids)
        mean, sd = _clinical_stats(spec, subj)
        cfg = validate_cohort(
            {
                **d,
                "kind": "ingested_emt",
                "resolved": resolved.model_dump(),
                "snp_ids": snp_ids,
                "genotypes_sha256": geno.fingerprint(),
                "clinical_mean": mean,
                "clinical_sd": sd,
            },
            str(path),
        )
    else:
        smax = spec.severity_max
        if smax is None:
            smax = float(np.nanmax(subj.severity)) if subj.severity is not None and len(subj.severity) else 1.0
            smax = smax if smax > 0 else 1.0
        elif subj.severity is not None and (subj.severity > smax).any():
            i = int(np.flatnonzero(subj.severity > smax)[0])
            raise IngestError(
                f"{root / spec.table}: severity {subj.severity[i]:g} of {subj.participant_id[i]} exceeds severity_max {smax:g}"
            )
        cfg = validate_cohort(
            {**d, "kind": "ingested_volume", "resolved": resolved.model_dump(), "severity_max": smax}, str(path)
        )
    _cache_put(cfg, subj)
    return cfg


def _clinical_stats(spec, subj: Subjects) -> tuple[list[float], list[float]]:
    """Mean and sd of each clinical column over the training split (all subjects of an
    unlabelled cohort, which has none); what the model sees is (x - mean) / sd."""
    x = subj.clinical.astype(np.float64)
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


# ---------------------------------------------------------------- per process
_CACHE: dict[str, Subjects] = {}


def _key(cfg) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def _cache_put(cfg, subj: Subjects) -> None:
    _CACHE.clear()  # one cohort at a time per process
    _CACHE[_key(cfg)] = subj


def subjects(cfg) -> Subjects:
    """The subjects of resolved config ``cfg`` (read again from the table in a new process)."""
    k = _key(cfg)
    if k not in _CACHE:
        root = Path(cfg.resolved.root)
        tpath = inside(root, cfg.table, "table")
        if not tpath.is_file() or _sha256(tpath) != cfg.resolved.table_sha256:
            raise IngestError(
                f"{tpath}: the table changed (or is gone) since this cohort was resolved; ingest it again"
            )
        spec_cls = ingest_spec_class(cfg.task)
        spec = spec_cls.model_validate({f: getattr(cfg, f) for f in spec_cls.model_fields})
        _cache_put(cfg, _collect(spec, root, headers=False))
    return _CACHE[k]


def source_stamps(cfg, first: int, stop: int) -> list[tuple[str, list[int]]]:
    """(image, [size, mtime_ns]) of subjects [first, stop): what a shard records of its sources.

    Size and modification time, not a hash: re-hashing every image of a big cohort on each
    rerun would cost a full read; a replaced or rewritten image changes its mtime."""
    out = []
    for p in subjects(cfg).image[first:stop]:
        try:
            st = os.stat(p)
            out.append((str(p), [int(st.st_size), int(st.st_mtime_ns)]))
        except OSError:
            out.append((str(p), [-1, -1]))
    return out


@lru_cache(maxsize=2)
def genotype_matrix(cfg_key: str):
    """All kept subjects' genotypes of the selected variants (uint8), read once per process."""
    from trd_hpc.config import validate_cohort
    from trd_hpc.ingest.genotypes import Genotypes

    cfg = validate_cohort(json.loads(cfg_key))
    geno = Genotypes(inside(Path(cfg.resolved.root), cfg.genotypes, "genotypes"))
    if geno.fingerprint() != cfg.genotypes_sha256:
        raise IngestError(
            f"{geno.files['fam']}: the genotype files changed since this cohort was resolved; ingest it again"
        )
    return geno.read(subjects(cfg).genotype_row, cfg.snp_ids)


def genotypes_of(cfg, index: int) -> np.ndarray:
    return genotype_matrix(_key(cfg))[index]


def source_record(cfg) -> dict:
    """The manifest's ``source`` section: where the data came from and what was done to it."""
    s = subjects(cfg)
    rec: dict = {
        "spec_folder": cfg.resolved.root,
        "table": cfg.table,
        "table_sha256": cfg.resolved.table_sha256,
        "participants": len(s.participant_id),
        "dropped": cfg.resolved.dropped,
        "image_template": cfg.fmri if cfg.task == "emt" else cfg.volume,
        "grid": list(cfg.grid),
        "images": "RAS+ (nibabel.as_closest_canonical); the brain's bounding box (voxels above 10% of the "
        "min..98th-percentile range) resampled onto the grid with one isotropic voxel size, linear "
        "(scipy.ndimage.affine_transform) after a Gaussian anti-alias filter; per-subject 'affine' "
        "(grid -> world mm) and 'source_affine' datasets in every shard",
    }
    if cfg.task == "emt":
        n_missing = int((genotype_matrix(_key(cfg)) == 3).sum())
        rec.update(
            {
                "frames": cfg.frames,
                "temporal": cfg.temporal,
                "fmri_normalisation": "z-score over brain voxels and frames per subject, background 0",
                "genotypes": cfg.genotypes,
                "genotype_coding": "count of the A1 allele 0/1/2; 3 = missing call",
                "missing_calls": n_missing,
                "snp_ids": cfg.snp_ids,
                "clinical": {
                    "columns": cfg.clinical_columns,
                    "mean": cfg.clinical_mean,
                    "sd": cfg.clinical_sd,
                    "fitted_on": "train" if cfg.labelled else "all subjects (unlabelled cohort)",
                    "missing": cfg.clinical_missing,
                    "imputed": {
                        c: int(np.isnan(s.clinical[:, j]).sum())
                        for j, c in enumerate(cfg.clinical_columns)
                        if np.isnan(s.clinical[:, j]).any()
                    },
                },
            }
        )
    else:
        rec.update(
            {
                "volume_normalisation": "stored as resampled; the loader z-scores then scales to [0, 1] per volume",
                "severity_max": cfg.severity_max,
            }
        )
    out: dict = {"source": rec}
    if s.site is not None:  # the loader's fold parts keep sites whole too (Manifest.subjects)
        from trd_hpc.ingest.splits import site_groups

        out["groups"] = site_groups(s.site).tolist()
        out["group_names"] = sorted(set(s.site))
    return out
