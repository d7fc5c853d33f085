"""``trd-hpc cohort validate`` and ``cohort info``: check a cohort against its manifest.

Quick (``--quick``): the manifest's structure, each shard's size, HDF5 layout,
own attributes (seed, config, subject range), subject ids and labels; no voxel
is read, so a changed value inside a chunk is not seen.  Deep (the default):
also every byte, against the content checksum and, to name the subject, the
per-subject CRC-32s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trd_hpc.data.kinds import kind_of
from trd_hpc.data.manifest import MANIFEST, Manifest, class_names, load_manifest
from trd_hpc.data.shards import (
    CohortError,
    ShardReader,
    check_shard_identity,
    check_shard_layout,
    encode_labels,
    label_column,
    open_shard,
    shard_content_checksum,
)


@dataclass
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def _check_shard(m: Manifest, k: int, deep: bool) -> list[Problem]:
    s = m.shards[k]
    path = m.root / s["file"]
    name = str(path)
    if not path.exists():
        return [Problem(name, "missing (named in manifest.json)")]
    size = path.stat().st_size
    if size != s["bytes"]:
        return [Problem(name, f"size {size} bytes, manifest says {s['bytes']} (truncated or replaced)")]
    try:
        with open_shard(path) as f:
            check_shard_layout(f, path, m.config, s["n_subjects"])
            check_shard_identity(f, path, m.config, s["first_subject"], s["n_subjects"], "manifest.json")
            ids = f["subject_id"][...]
            labels = f[label_column(m.config)][...]
            first = int(f.attrs.get("first_subject", -1))
    except (CohortError, OSError, KeyError) as e:
        return [Problem(name, str(e).replace(f"{path}: ", ""))]
    out = []
    want_ids = np.arange(s["first_subject"], s["first_subject"] + s["n_subjects"])
    if first != s["first_subject"] or not np.array_equal(ids, want_ids):
        out.append(Problem(name, f"subject ids are not {want_ids[0]}..{want_ids[-1]} as the manifest says"))
    if encode_labels(labels) != s["labels"]:
        out.append(Problem(name, "labels differ from the manifest's"))
    if deep:
        try:
            got = shard_content_checksum(path, m.config)
        except (CohortError, OSError) as e:
            return out + [Problem(name, f"unreadable while checksumming: {e}")]
        if got != s["checksum"]:
            out.append(
                Problem(
                    name,
                    f"checksum mismatch (content changed or corrupt): {got} != manifest {s['checksum']}"
                    + _bad_subjects(m, k),
                )
            )
    return out


def _bad_subjects(m: Manifest, k: int) -> str:
    s = m.shards[k]
    if "row_crc32" not in s:
        return ""
    try:
        r = ShardReader(m.root / s["file"], m.config, s["n_subjects"])
        try:
            bad = r.bad_rows(range(s["n_subjects"]), s["row_crc32"])
        finally:
            r.close()
    except (CohortError, OSError):
        return ""
    if not bad:
        return ""
    return f"; subjects changed: {', '.join(str(s['first_subject'] + j) for j in bad[:10])}" + (
        " ..." if len(bad) > 10 else ""
    )


def _check_balance_and_splits(m: Manifest) -> list[Problem]:
    out = []
    man = str(m.root / MANIFEST)
    labels = m.labels()
    n = len(labels)
    names = class_names(m.config)
    if not m.labelled:  # prediction only: no classes to count, every subject in `test`
        if sorted(m.splits.get("test", [])) != list(range(n)) or m.splits.get("train") or m.splits.get("val"):
            out.append(Problem(man, "an unlabelled cohort must have every subject in split 'test' and none elsewhere"))
        return out
    counts = np.bincount(labels, minlength=len(names))
    recorded = m.raw.get("class_counts", {})
    if recorded and [recorded.get(c) for c in names] != counts.tolist():
        out.append(Problem(man, f"class_counts {recorded} do not match the shard labels {counts.tolist()}"))
    why = kind_of(m.config).class_count_problem(m.config, counts)
    if why:
        out.append(Problem(man, why))
    seen = np.zeros(n, dtype=np.int64)
    for name, ids in m.splits.items():
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            out.append(Problem(man, f"split '{name}' names subjects outside 0..{n - 1}"))
            continue
        seen[ids] += 1
        frac = np.bincount(labels[ids], minlength=len(names)) / max(len(ids), 1)
        overall = counts / n
        # site-grouped splits (an ingested cohort's site_column) are as stratified as whole sites allow
        grouped = getattr(m.config, "site_column", None) is not None
        if len(ids) >= 20 and not grouped and np.abs(frac - overall).max() > 0.1:
            out.append(Problem(man, f"split '{name}' is not stratified: class fractions {frac.round(3).tolist()}"))
    if (seen > 1).any():
        out.append(Problem(man, f"{int((seen > 1).sum())} subjects are in more than one split"))
    if (seen == 0).any():
        out.append(Problem(man, f"{int((seen == 0).sum())} subjects are in no split"))
    if m.folds:
        fold_seen = np.zeros(n, dtype=np.int64)
        for f in m.folds:
            fold_seen[np.asarray(f, dtype=np.int64)] += 1
        if not (fold_seen == 1).all():
            out.append(Problem(man, "folds do not cover every subject exactly once"))
    return out


def validate_cohort_dir(root: str | Path, deep: bool = True, progress: bool = True) -> list[Problem]:
    """All problems found (empty when the cohort is sound)."""
    root = Path(root)
    try:
        m = load_manifest(root)
    except CohortError as e:
        return [Problem(str(root / MANIFEST), str(e).split(": ", 1)[-1])]
    from tqdm import tqdm

    problems: list[Problem] = []
    for k in tqdm(range(len(m.shards)), desc="validate", unit="shard", disable=not progress):
        if not m.virtual:  # a virtual cohort has no shard files to check
            problems += _check_shard(m, k, deep)
    expected_n = m.config.n_subjects
    if m.n_subjects != expected_n:
        problems.append(Problem(str(root / MANIFEST), f"shards hold {m.n_subjects} subjects, config says {expected_n}"))
    problems += _check_balance_and_splits(m)
    return problems


def cohort_summary(root: str | Path) -> str:
    m = load_manifest(root)
    total = sum(s["bytes"] for s in m.shards)
    cfg = m.config
    lines = [
        f"cohort      {Path(root).resolve()}",
        f"kind        {m.kind} (schema {m.raw['schema_version']}, {m.raw.get('generator', '?')})",
        f"subjects    {m.n_subjects} in {len(m.shards)} shards, {total / 1e9:.3f} GB"
        + (" (virtual: regenerated from (seed, i) when read)" if m.virtual else ""),
        f"seed        {cfg.seed}",
    ]
    src = m.raw.get("source")
    if isinstance(src, dict):  # an ingested cohort
        lines.append(f"source      {Path(src.get('spec_folder', '?')) / str(src.get('table', '?'))}")
        dropped = src.get("dropped") or []
        lines.append(
            f"            {src.get('participants')} participants in, {len(dropped)} dropped"
            + (
                f" ({', '.join(d.get('participant_id', '?') for d in dropped[:5])}{' ...' if len(dropped) > 5 else ''})"
                if dropped
                else ""
            )
        )
        if not m.labelled:
            lines.append("            unlabelled: for prediction only")
    for name, d in m.raw.get("datasets", {}).items():
        lines.append(f"  {name:<11} {d['dtype']:<8} {tuple(d['shape'])}")
    lines.append(f"classes     {m.raw.get('class_counts')}")
    for name, ids in m.splits.items():
        lines.append(f"  {name:<6} {len(ids):>7}  {m.raw.get('split_class_counts', {}).get(name, '')}")
    if m.folds:
        lines.append(f"folds       {len(m.folds)} x ~{len(m.folds[0])} subjects")
    return "\n".join(lines)
