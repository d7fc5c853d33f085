"""What an ingest spec of one paper means: its sources and how they become that paper's cohort.

Each ingested cohort kind carries one ``IngestMapping`` (its ``CohortKind.ingest``), written
in the paper's folder (``trd_hpc/tasks/<paper>/ingested.py``).  ``trd_hpc.ingest.resolve`` is
the same for every paper: it reads the table, finds each subject's sources through their
readers (``trd_hpc.ingest.readers``) and asks the mapping for what is the paper's own - which
columns hold its outcomes, what a subject may lack, the fields its resolved cohort config
adds, how it is split and what the manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Source:
    """A source a spec names by the path in spec key ``key``."""

    key: str  # the spec key holding its path ("fmri", "volume", "genotypes")
    role: str  # its reader role (trd_hpc.ingest.readers.ROLES)
    default_format: str
    # cohort-wide sources (role genotypes): the resolved config's field holding the fileset's
    # fingerprint, checked each time a process reads it
    fingerprint_field: str | None = None
    # an image found in a derivatives folder: the files beside it the paper reads
    # ("mask": the pipeline's brain mask; "confounds": its confounds TSV, when the spec asks)
    sidecars: tuple[str, ...] = ()


@dataclass(frozen=True)
class IngestMapping:
    kind: str  # the cohort kind a resolved spec becomes
    label_key: str  # the spec key naming the label column (None in a spec: unlabelled)
    n_classes: int
    image: Source  # one image per subject, by path template with {id}
    image_ndim: int  # 3 (a volume) or 4 (x, y, z, time)
    # one fileset for every subject, by id; one whose spec key is left out (None) is not read, and
    # under on_missing: keep its modality is absent for every subject
    cohort_sources: tuple[Source, ...] = ()
    # spec -> the frames an image needs at least (4-D), or None
    min_frames: Callable[[Any], int | None] = lambda spec: None
    # (spec, table, table path) -> more per-subject arrays read from the table ({"severity": ...})
    table_values: Callable[[Any, Any, Path], dict[str, np.ndarray]] = lambda spec, df, tpath: {}
    # (spec, values) -> {row: [what it lacks]}: values the spec needs that a row does not hold
    lacking: Callable[[Any, dict[str, np.ndarray]], dict[int, list[str]]] = lambda spec, values: {}
    # (spec, values) -> {row: {modality}}: table modalities a row holds no value of at all (the
    # EMT: every clinical column empty); under on_missing: keep that modality is absent for it
    # (present 0), never imputed as if observed; otherwise the paper's own policy applies
    absent_values: Callable[[Any, dict[str, np.ndarray]], dict[int, set[str]]] = lambda spec, values: {}
    # (spec, table path, values, kept rows) -> None; raises on what no policy can mend
    check: Callable[[Any, Path, dict[str, np.ndarray], np.ndarray], None] = lambda spec, tpath, values, keep: None
    # (spec, its folder, {source key: opened cohort-wide source}, {source key: each row's place
    # in it}, rows still kept) -> {row: [why]}: subjects a quality filter removes (always
    # dropped and listed, whatever on_missing says: a genotype call rate below snps.mind)
    screen: Callable[[Any, Path, dict, dict, np.ndarray], dict[int, list[str]]] = (
        lambda spec, root, sources, rows, kept: {}
    )
    # (spec, its folder, {source key: opened cohort-wide source}) -> None: checks of what the
    # spec selects from them (the variants of snps:), run even when other sources fail
    check_selection: Callable[[Any, Path, dict], None] = lambda spec, root, sources: None
    # (spec, subjects) -> None: checks of the files found beside the images (sidecars)
    check_sources: Callable[[Any, Any], None] = lambda spec, subj: None
    # (spec, its folder, subjects, {source key: opened cohort-wide source}) -> the resolved
    # config's own fields
    resolved_fields: Callable[[Any, Path, Any, dict[str, Any]], dict] = lambda spec, root, subj, sources: {}
    # (labels, spec, site groups or None) -> (splits {train, val, test}, cross-validation folds)
    split: Callable[[np.ndarray, Any, np.ndarray | None], tuple[dict, list]] | None = None
    # (resolved cfg, subjects) -> the paper's part of the manifest's ``source`` record
    record: Callable[[Any, Any], dict] = lambda cfg, subj: {}
    # the modalities a subject may lack under on_missing: keep, by spec key, in the order of the
    # shards' ``present`` column (the EMT: fmri, genotypes, clinical); () : keep is refused
    modalities: tuple[str, ...] = ()
    # example folders to ingest by layout name, the first the default (`trd-hpc example-data
    # DIR --task T [--layout L]`): (empty folder, number of subjects) -> the spec
    examples: dict[str, Callable[[Path, int], Path]] = field(default_factory=dict)

    def sources(self) -> tuple[Source, ...]:
        return (self.image, *self.cohort_sources)


def mapping_of(spec) -> IngestMapping:
    """The IngestMapping of a spec's (or a resolved config's) cohort kind."""
    from trd_hpc.data.kinds import get

    kind = getattr(type(spec), "cohort_kind", None)
    m = get(kind).ingest if isinstance(kind, str) else None
    if m is None:
        from trd_hpc.errors import ConfigError

        raise ConfigError(f"ingest spec of task {spec.task!r}: its class names no ingested cohort kind with a mapping")
    return m
