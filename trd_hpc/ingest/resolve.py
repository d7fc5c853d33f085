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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from trd_hpc.cohort_config import Resolved
from trd_hpc.config import format_validation_error, ingest_spec_class, ingest_tasks, validate_cohort
from trd_hpc.errors import ConfigError, IngestError
from trd_hpc.ingest import readers
from trd_hpc.ingest import table as T
from trd_hpc.ingest.mapping import IngestMapping, Source, mapping_of


@dataclass
class Subjects:
    """The cohort's subjects in table order, after any dropped."""

    participant_id: list[str]  # as written in the table
    key: list[str]  # the BIDS label ('01' for 'sub-01')
    image: list[Path]
    label: np.ndarray  # int64, -1 when unlabelled
    values: dict[str, np.ndarray]  # the paper's own per-subject values from the table (IngestMapping.table_values)
    rows: dict[str, np.ndarray]  # each subject's row in each cohort-wide source, by spec key ("genotypes")
    site: list[str] | None
    dropped: list[dict[str, str]]
    # files found beside each image in a derivatives folder ("mask", "confounds"), None where absent
    sidecars: dict[str, list[Path | None]] = field(default_factory=dict)
    # on_missing: keep: [n, modalities] 1 where the subject has that modality (IngestMapping.modalities)
    present: np.ndarray | None = None


def _check_formats(spec, m: IngestMapping) -> None:
    keys = ["table"] + [src.key for src in m.sources()]
    unknown = [k for k in spec.formats if k not in keys]
    if unknown:
        raise ConfigError(
            f"spec key 'formats': {', '.join(map(repr, unknown))} is not a source of this spec; sources: {', '.join(keys)}"
        )


def _reader(spec, src: Source):
    return readers.reader(src.role, spec.formats.get(src.key, src.default_format), src.key)


def image_reader(cfg):
    """The reader of a resolved cohort's images (the shard writers call it)."""
    return _reader(cfg, mapping_of(cfg).image)


def open_source(spec, root: Path, src: Source):
    """A cohort-wide source (a genotype fileset) opened by its reader."""
    return _reader(spec, src).open(inside(root, getattr(spec, src.key), src.key))


def _read_table(spec, tpath: Path):
    fmt = spec.formats.get("table")
    if fmt is None:
        return T.read_table(tpath)  # by its suffix
    return readers.reader("table", fmt, "table").read(tpath)


class Problems:
    """Every problem one pass over a spec's sources finds (``trd-hpc ingest --check``): each
    step that fails is recorded and the next one runs on what is known, so a folder with
    several faults is fixed in one go."""

    def __init__(self):
        self.items: list[str] = []
        # what the pass learnt on the way, for the ingest report: availability of each
        # source, dropped subjects, each kept image's geometry
        self.facts: dict = {}
        self.sources: dict = {}  # the cohort-wide sources (genotype filesets), opened once a pass

    def attempt(self, fn, *args, default=None, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IngestError as e:
            self.items.append(str(e))
            return default

    def add(self, message: str) -> None:
        self.items.append(message)

    def error(self, spec_path) -> IngestError | None:
        if not self.items:
            return None
        if len(self.items) == 1:
            return IngestError(self.items[0])
        listed = "; ".join(f"({k}) {msg}" for k, msg in enumerate(self.items, 1))
        return IngestError(f"{spec_path}: {len(self.items)} problems: {listed}")


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


def _images(spec, m: IngestMapping, root: Path, keys: list[str]):
    """(each subject's image path, {sidecar: paths}, problems) by the spec's template or, for
    ``{derivatives: DIR, ...}``, by BIDS entities (trd_hpc.ingest.bids).  A path that does not
    exist marks a missing image (named as a pipeline would have named it)."""
    how = getattr(spec, m.image.key)
    if isinstance(how, str):
        return [_image_path(root, how, k, m.image.key) for k in keys], {}
    from trd_hpc.ingest import bids

    d = bids.index(str(inside(root, how.derivatives, f"{m.image.key}.derivatives")))
    want = how.entities()
    paths = []
    for k in keys:
        hit = bids.one(d, k, want, m.image.key)
        paths.append(hit if hit is not None else d.expected(k, want))
    sidecars: dict[str, list[Path | None]] = {}
    if "mask" in m.image.sidecars:
        sidecars["mask"] = [bids.one(d, k, bids.mask_entities(want), m.image.key) for k in keys]
    if "confounds" in m.image.sidecars and getattr(spec, "confounds", None) is not None:
        ce = bids.confounds_entities(want)
        sidecars["confounds"] = [bids.one(d, k, ce, "confounds", extensions=(".tsv",)) for k in keys]
        sidecars["confounds_expected"] = [d.expected(k, ce, extension=".tsv") for k in keys]
    return paths, sidecars


def _sites(spec, df, tpath: Path) -> list[str] | None:
    """Each subject's group: its site_column value, or, with group_columns too, the set of
    subjects linked through any of those columns (trd_hpc.ingest.splits.combine_groups)."""
    cols = ([spec.site_column] if spec.site_column else []) + list(spec.group_columns)
    if not cols:
        return None
    values = []
    for c in cols:
        key = "site_column" if c == spec.site_column else "group_columns"
        col = T.column(df, tpath, c, key)
        if col.isna().any():
            raise IngestError(f"{tpath}: column '{c}' is empty on line(s) {T.lines(col.index[col.isna()])}")
        values.append([str(v).strip() for v in col])
    if len(values) == 1:
        return values[0]
    from trd_hpc.ingest.splits import combine_groups

    return combine_groups(values)


def _lacking(spec, m: IngestMapping, sources: dict, keys, images, label, label_col, values, absent=None):
    """({row: what the subject lacks}, {source key: rows}): only a missing source may be
    dropped (on_missing: drop).  Under on_missing: keep, a missing modality goes to
    ``absent`` ({row: {spec key}}) instead of ``lacks``."""
    lacks: dict[int, list[str]] = {}
    keep = spec.on_missing == "keep"

    def lack(i: int, key: str, why: str) -> None:
        if keep and key in m.modalities:
            absent.setdefault(int(i), set()).add(key)
        else:
            lacks.setdefault(int(i), []).append(why)

    rows = {}
    for src in m.cohort_sources:
        if src.key not in sources:  # the spec names none (a cohort without genotypes)
            if keep and src.key in m.modalities:
                for i in range(len(keys)):
                    absent.setdefault(i, set()).add(src.key)
            continue
        index = sources[src.key]
        rows[src.key] = np.array([index.row.get(k, -1) for k in keys], dtype=np.int64)
        for i in np.flatnonzero(rows[src.key] < 0):
            lack(i, src.key, f"no {src.key} (IID not in {index.index_name})")
    for i, p in enumerate(images):
        if not p.is_file():
            lack(i, m.image.key, f"no {m.image.key} image ({p})")
    if label_col is not None:
        for i in np.flatnonzero(label < 0):
            lacks.setdefault(int(i), []).append(f"no value in '{label_col}'")
    for i, what in m.lacking(spec, values).items():
        lacks.setdefault(int(i), []).extend(what)
    if keep:
        for i, gone in m.absent_values(spec, values).items():
            absent.setdefault(int(i), set()).update(gone)
        for i, gone in absent.items():
            if set(m.modalities) <= gone:  # kept, it would hold nothing to predict from
                lacks.setdefault(int(i), []).append(f"none of {', '.join(m.modalities)}")
    return lacks, rows


def _screen(spec, m: IngestMapping, root: Path, sources: dict, rows: dict, n: int, lacks: dict):
    """The rows a quality filter of the mapping removes ({row: [why]}), among those lacking nothing."""
    kept = np.array([i for i in range(n) if i not in lacks], dtype=np.int64)
    if not m.cohort_sources or not len(kept):
        return {}
    return m.screen(spec, root, sources, rows, kept)


def named_sources(spec, m: IngestMapping) -> tuple[Source, ...]:
    """The cohort-wide sources the spec names (one left out, ``genotypes: null``, is not read)."""
    return tuple(src for src in m.cohort_sources if getattr(spec, src.key, None) is not None)


def _open_sources(spec, m: IngestMapping, root: Path) -> dict:
    return {src.key: open_source(spec, root, src) for src in named_sources(spec, m)}


def _check_headers(spec, m: IngestMapping, images, written, keep, geometry: dict | None = None) -> None:
    """Headers of the kept images: a file the reader cannot read, or of the wrong kind, is an
    error whatever on_missing says (it is there, so it was meant to be used).  ``geometry``
    receives each readable one's shape, voxel size, orientation and time step."""
    reader = _reader(spec, m.image)
    problems = []
    for i in keep:
        try:
            h = reader.header(images[i], written[i], m.image_ndim, m.min_frames(spec))
        except IngestError as e:
            problems.append(str(e))
            continue
        if geometry is not None:
            geometry[written[i]] = _geometry(h)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IngestError("; ".join(problems[:5]) + more)


def _present(m: IngestMapping, keep: np.ndarray, absent: dict) -> np.ndarray:
    """[kept, modalities] uint8: 1 where the subject has the modality."""
    out = np.ones((len(keep), len(m.modalities)), dtype=np.uint8)
    for r, i in enumerate(keep):
        for j, key in enumerate(m.modalities):
            if key in absent.get(int(i), ()):
                out[r, j] = 0
    return out


def _availability(m: IngestMapping, images, rows, sidecars, n: int) -> dict:
    """How many of the table's subjects have each source."""
    out = {m.image.key: int(sum(1 for p in images if p.is_file()))}
    for key, r in (rows or {}).items():
        out[key] = int((r >= 0).sum())
    for key, paths in sidecars.items():
        if key != "confounds_expected":
            out[key] = int(sum(1 for p in paths if p is not None))
    return {"of": n, **out}


def _geometry(h) -> dict:
    import nibabel as nib

    zooms = [round(float(z), 4) for z in h.zooms]
    return {
        "shape": list(h.shape),
        "voxel_mm": zooms[:3],
        "orientation": "".join(nib.aff2axcodes(h.affine)),
        "t_r": zooms[3] if len(zooms) > 3 else None,
    }


def _sources_and_lacks(spec, m: IngestMapping, root: Path, problems: Problems, *lacking_args):
    """The cohort-wide sources opened once for the pass (problems.sources), then ``_lacking``;
    a fileset that cannot be opened is recorded and the rest of the pass goes on (rows None)."""
    problems.sources = problems.attempt(_open_sources, spec, m, root, default=None)
    if problems.sources is None:
        return {}, None
    return problems.attempt(_lacking, spec, m, problems.sources, *lacking_args, default=({}, None))


def _collect(spec, root: Path, headers: bool = True, problems: Problems | None = None) -> Subjects | None:
    """Every row of the table with its sources.  Problems no policy can mend are recorded in
    ``problems`` (None: raised together at the end); the table and its ids must read.

    ``headers``: read every kept image's header too (``resolve``; a worker that rebuilds
    the list skips it: each image it writes is read whole anyway, and errors name it)."""
    own = problems is None
    problems = Problems() if own else problems
    m = mapping_of(spec)
    _check_formats(spec, m)
    tpath = inside(root, spec.table, "table")
    df = _read_table(spec, tpath)
    written, keys = T.ids(df, tpath, spec.id_column)
    n = len(keys)
    images, sidecars = _images(spec, m, root, keys)
    label_col = getattr(spec, m.label_key)
    unlabelled = np.full(n, -1, dtype=np.int64)
    label = unlabelled
    if label_col is not None:
        label = problems.attempt(T.class_labels, df, tpath, label_col, spec.labels, m.n_classes, m.label_key)
    labels_ok = label is not None
    label = label if labels_ok else unlabelled
    values = problems.attempt(m.table_values, spec, df, tpath)
    if spec.harmonize is not None and values is not None:  # its site and covariate columns
        from trd_hpc.ingest.harmonize import collect_values

        collect_values(spec, m, df, tpath, problems, values)
    site = problems.attempt(_sites, spec, df, tpath)
    if spec.on_missing == "keep" and not m.modalities:
        problems.add(f"spec key 'on_missing': keep needs a model of several modalities; task {spec.task} has one")
    absent: dict[int, set[str]] = {}
    lacks, rows = _sources_and_lacks(
        spec, m, root, problems, keys, images, label, label_col if labels_ok else None, values or {}, absent
    )
    for i, p in enumerate(sidecars.get("confounds", [])):
        if p is None:
            lacks.setdefault(i, []).append(f"no confounds TSV ({sidecars['confounds_expected'][i]})")
    sidecars.pop("confounds_expected", None)
    qc_drops = {}
    if rows is not None:
        qc_drops = problems.attempt(_screen, spec, m, root, problems.sources, rows, n, lacks, default={})
    problems.facts["availability"] = _availability(m, images, rows, sidecars, n)
    if rows is not None and m.cohort_sources:
        problems.attempt(m.check_selection, spec, root, problems.sources)
    if lacks and spec.on_missing == "error":
        listed = "; ".join(f"{written[i]} (line {i + 2}): {', '.join(w)}" for i, w in sorted(lacks.items())[:10])
        more = f"; and {len(lacks) - 10} more" if len(lacks) > 10 else ""
        problems.add(
            f"{tpath}: {len(lacks)} subject(s) lack a source: {listed}{more}. Fix them, or set on_missing: drop "
            f"in the spec to leave them out (they are then listed in the manifest)"
        )
    long_ids = [f"{w} (line {i + 2})" for i, w in enumerate(written) if len(w.encode()) > 64]
    if long_ids:
        problems.add(f"{tpath}: ids longer than 64 bytes: {', '.join(long_ids[:5])}")
    for i, why in qc_drops.items():
        lacks.setdefault(i, []).extend(why)
    keep = np.array([i for i in range(n) if i not in lacks], dtype=np.int64)
    dropped = [{"participant_id": written[i], "reason": ", ".join(w)} for i, w in sorted(lacks.items())]
    problems.facts.update({"table_rows": n, "kept": int(len(keep)), "dropped": dropped})
    if not len(keep):
        problems.add(f"{tpath}: no subject has every source the spec names")
    else:
        if label_col is not None and labels_ok:
            problems.attempt(_check_classes, tpath, label_col, label[keep], spec.labels, m.n_classes)
        if headers:
            problems.facts["geometry"] = {}
            with_image = np.array([i for i in keep if m.image.key not in absent.get(int(i), ())], dtype=np.int64)
            problems.attempt(_check_headers, spec, m, images, written, with_image, problems.facts["geometry"])
        if values is not None:
            problems.attempt(m.check, spec, tpath, values, keep)
    subj = None
    if len(keep) and values is not None and rows is not None:
        subj = Subjects(
            participant_id=[written[i] for i in keep],
            key=[keys[i] for i in keep],
            image=[images[i] for i in keep],
            label=label[keep],
            values={k: v[keep] for k, v in values.items()},
            rows={k: r[keep] for k, r in rows.items()},
            site=None if site is None else [site[i] for i in keep],
            dropped=dropped,
            sidecars={k: [v[i] for i in keep] for k, v in sidecars.items()},
            present=_present(m, keep, absent) if spec.on_missing == "keep" else None,
        )
        problems.facts["absent"] = {
            f"{'+'.join(sorted(gone))}": sum(1 for i in keep if absent.get(int(i)) == gone)
            for gone in {frozenset(g) for g in absent.values()}
        }
        if headers:
            problems.attempt(m.check_sources, spec, subj)
    if own and problems.error(tpath) is not None:
        raise problems.error(tpath)
    return subj


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


def resolve(path: str | Path, problems: Problems | None = None):
    """The cohort config of the spec at ``path`` (the kind its mapping names).  Every problem
    found is raised together at the end; with ``problems`` they are recorded there instead and
    the result is None when there were any (``trd-hpc ingest --check``)."""
    path = Path(path).resolve()
    own = problems is None
    problems = Problems() if own else problems
    spec = load_spec(path)
    root = path.parent
    m = mapping_of(spec)
    subj = _collect(spec, root, problems=problems)
    cfg = None
    if subj is not None and not problems.items:
        cfg = problems.attempt(_resolved_config, spec, path, m, subj, problems.sources)
    if own and problems.error(path) is not None:
        raise problems.error(path)
    if problems.items:
        return None
    _cache_put(cfg, subj)
    return cfg


def _resolved_config(spec, path: Path, m: IngestMapping, subj: Subjects, sources: dict):
    root = path.parent
    resolved = Resolved(
        root=str(root),
        table_sha256=_sha256(inside(root, spec.table, "table")),
        n_subjects=len(subj.key),
        dropped=subj.dropped,
    )
    fields = m.resolved_fields(spec, root, subj, sources)
    for src in named_sources(spec, m):
        if src.fingerprint_field is not None:
            fields[src.fingerprint_field] = sources[src.key].fingerprint()
    d = spec.model_dump(mode="json")
    return validate_cohort({**d, "kind": m.kind, "resolved": resolved.model_dump(), **fields}, str(path))


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
    """(image, [size, mtime_ns, ...]) of subjects [first, stop): what a shard records of its
    sources, the files found beside each image (a confounds TSV, a mask) after its own.

    Size and modification time, not a hash: re-hashing every image of a big cohort on each
    rerun would cost a full read; a replaced or rewritten image changes its mtime."""
    s = subjects(cfg)
    out = []
    for i in range(first, stop):
        stamp: list[int] = []
        for p in [s.image[i], *(v[i] for v in s.sidecars.values())]:
            if p is None:
                continue
            try:
                st = os.stat(p)
                stamp += [int(st.st_size), int(st.st_mtime_ns)]
            except OSError:
                stamp += [-1, -1]
        out.append((str(s.image[i]), stamp))
    return out


@lru_cache(maxsize=2)
def _source_matrix(cfg_key: str, key: str) -> np.ndarray:
    """What the kept subjects hold in cohort-wide source ``key`` (the selected variants'
    genotypes, uint8), read once per process."""
    cfg = validate_cohort(json.loads(cfg_key))
    src = next(s for s in mapping_of(cfg).cohort_sources if s.key == key)
    index = open_source(cfg, Path(cfg.resolved.root), src)
    if src.fingerprint_field is not None and index.fingerprint() != getattr(cfg, src.fingerprint_field):
        raise IngestError(
            f"{index.index_name} ({getattr(cfg, key)}): the {key} files changed since this cohort was resolved; "
            "ingest it again"
        )
    rows = subjects(cfg).rows[key]
    have = rows >= 0  # a subject kept without this source (on_missing: keep) reads as 0, marked absent
    out = np.zeros((len(rows), len(cfg.snp_ids)), dtype=np.uint8)
    if have.any():
        out[have] = index.read(rows[have], cfg.snp_ids)
    return out


def source_matrix(cfg, key: str) -> np.ndarray:
    return _source_matrix(_key(cfg), key)


def _images_record(cfg, m: IngestMapping) -> dict:
    how = getattr(cfg, m.image.key)
    if isinstance(how, str):
        return {"image_template": how}
    from trd_hpc.ingest import bids

    d = bids.index(str(inside(Path(cfg.resolved.root), how.derivatives, m.image.key)))
    return {"images_from": {**how.model_dump(mode="json"), "generated_by": d.generated_by()}}


def source_record(cfg) -> dict:
    """The manifest's ``source`` section: where the data came from and what was done to it."""
    m = mapping_of(cfg)
    s = subjects(cfg)
    rec: dict = {
        "spec_folder": cfg.resolved.root,
        "table": cfg.table,
        "table_sha256": cfg.resolved.table_sha256,
        "participants": len(s.participant_id),
        "dropped": cfg.resolved.dropped,
        **_images_record(cfg, m),
        "formats": {src.key: cfg.formats.get(src.key, src.default_format) for src in (m.image, *named_sources(cfg, m))},
        "grid": list(cfg.grid),
        "images": image_reader(cfg).describe,
        **m.record(cfg, s),
    }
    out: dict = {"source": rec}
    if s.site is not None:  # the loader's fold parts keep sites whole too (Manifest.subjects)
        from trd_hpc.ingest.splits import site_groups

        out["groups"] = site_groups(s.site).tolist()
        out["group_names"] = sorted(set(s.site))
    return out
