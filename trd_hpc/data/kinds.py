"""The cohort-kind registry: what differs between kinds of cohort, behind one record.

A kind (``cohort.kind`` in a config: ``emt``, ``volume``) says which columns a shard holds
(``schema``: name, per-subject shape, dtype; the first is the bulk image), which column is the
class label and the classes' names, how subject ``i`` is made, how the cohort is split, what
a plausible class balance is, and what the loader does to a batch (``prepare_batch``).  The
sharded writer, the manifest, the checksums, the validator and the loader work from this
record alone.  The papers' kinds are in their folders (``trd_hpc/tasks/NAME/cohort.py`` and
``ingested.py``); a kind of your own is a ``register(KIND)`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from trd_hpc.config import register_cohort
from trd_hpc.registry import BUILTIN_TASKS, Registry


@dataclass(frozen=True)
class Column:
    name: str
    shape: tuple[int, ...]  # per subject
    dtype: str
    chunked: bool  # one subject per chunk (the per-subject arrays)
    load: bool = True  # False: kept for tracing (ids, affines), not read by the loader
    high: int | None = None  # integer columns: values lie in 0..high-1 (flags: 2), when not genotypes


@dataclass(frozen=True)
class CohortKind:
    name: str
    config_class: type
    schema: Callable[[Any], list[Column]]
    label_column: str
    class_names: Callable[[Any], list[str]]
    # (cfg, index, bulk_out) -> the subject's other columns; fills bulk_out in place
    make_subject: Callable[[Any, int, np.ndarray], dict]
    # every subject's class, without making the subjects (to check the splits before writing)
    predicted_labels: Callable[[Any], np.ndarray]
    # (cfg, labels) -> (splits {train, val, test}, cross-validation folds)
    make_splits: Callable[[Any, np.ndarray], tuple[dict[str, list[int]], list[list[int]]]]
    # (cfg, class counts) -> why they are implausible for this config, or None
    class_count_problem: Callable[[Any, np.ndarray], str | None]
    # (cfg, batch of tensors, normalize) -> the batch the model sees
    prepare_batch: Callable[[Any, dict, bool], dict] | None = None
    # cfg -> more top-level keys of manifest.json (an ingested cohort: where it came from)
    manifest_extras: Callable[[Any], dict] | None = None
    # (cfg, first, stop) -> per subject (its source file, [size, mtime_ns]): an ingested
    # shard records them, and is made again once a source changed (an image replaced)
    source_stamp: Callable[[Any, int, int], list[tuple[str, list[int]]]] | None = None
    # False: subjects come from files (trd-hpc ingest); the cohort describes the data and
    # a run's cohort section is taken from its manifest (trd_hpc.cohort.resolve_cohort)
    generated: bool = True
    # what a generated kind implements, as a report's banner names it ("paper 000")
    generator: str | None = None
    # an ingested kind: what its ingest spec means (trd_hpc.ingest.mapping.IngestMapping)
    ingest: Any = None
    # a kind whose subjects may lack a modality: the names of its ``present`` column's flags, in
    # order (the EMT: fmri, genotypes, clinical); what ``data.complete_cases`` names
    modalities: tuple[str, ...] = ()


BUILTIN = tuple(f"trd_hpc.tasks.{name}.{mod}" for name in BUILTIN_TASKS for mod in ("cohort", "ingested"))
_REGISTRY: Registry[CohortKind] = Registry("cohort kind", BUILTIN, "KIND", register_cohort)
register = _REGISTRY.register
get = _REGISTRY.get


def kind_of(cfg) -> CohortKind:
    """The kind of a cohort config (its ``kind`` field)."""
    return get(cfg.kind)
