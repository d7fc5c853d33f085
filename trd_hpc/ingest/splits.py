"""Splits of an ingested cohort: stratified by class at subject level, as for synthetic
cohorts, or additionally grouped by site (``site_column``) so that no site is in two
splits or two folds (and within a fold's run, not in both its training and validation
part).  An unlabelled cohort has no training data: every subject is in ``test`` (what
``predict`` reads by default)."""

from __future__ import annotations

import numpy as np

from trd_hpc.data.splits import fold_parts, stratified_folds, three_way_split, train_test_with_val
from trd_hpc.errors import IngestError
from trd_hpc.ingest.mapping import mapping_of


def combine_groups(columns: list[list[str]]) -> list[str]:
    """Each subject's group when subjects sharing a value in any column belong together (a site,
    a family): the connected components of that relation (scipy), each named by its values of
    the first column joined with '+'."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(columns[0])
    rows, cols = [], []
    offset = n
    for values in columns:  # subject -- value edges; values are extra nodes after the subjects
        codes = np.unique(np.asarray(values), return_inverse=True)[1]
        rows.append(np.arange(n))
        cols.append(offset + codes)
        offset += int(codes.max()) + 1
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(offset, offset))
    _, comp = connected_components(graph, directed=False)
    first = np.asarray(columns[0])
    names = {k: "+".join(sorted(set(first[comp[:n] == k]))) for k in np.unique(comp[:n])}
    return [names[k] for k in comp[:n]]


def site_groups(sites: list[str] | None) -> np.ndarray | None:
    """Each subject's site as an integer (sites in sorted order), or None."""
    return None if sites is None else np.unique(np.asarray(sites), return_inverse=True)[1].astype(np.int64)


def splits_for(spec, labels: np.ndarray, sites: list[str] | None):
    """(splits {train, val, test}, folds) of an ingested cohort, as its mapping splits it."""
    n = len(labels)
    if (labels < 0).all():
        return {"train": [], "val": [], "test": list(range(n))}, []
    groups = site_groups(sites)
    try:
        return mapping_of(spec).split(labels, spec, groups)
    except ValueError as e:
        cols = ([spec.site_column] if spec.site_column else []) + list(getattr(spec, "group_columns", []))
        grouped = f" grouped by {', '.join(repr(c) for c in cols)}" if groups is not None else ""
        raise IngestError(
            f"the {n} subjects cannot be split{grouped} as the spec's split asks ({' '.join(str(e).split())}); "
            f"more subjects or sites, other fractions or fewer folds"
        ) from None


def three_way(labels: np.ndarray, spec, groups: np.ndarray | None):
    """Train / val / test by the spec's fractions, no cross-validation folds (paper 000)."""
    split = spec.split
    return three_way_split(labels, split.train, split.val, split.test, spec.seed, groups), []


def held_out_test_and_folds(labels: np.ndarray, spec, groups: np.ndarray | None):
    """A held-out test split and the spec's cross-validation folds over all subjects, each
    fold's parts checked now (what `trd-hpc cv` asks for) (paper 001)."""
    split = spec.split
    folds = stratified_folds(labels, split.folds, spec.seed, groups)
    for k in range(len(folds)):
        fold_parts(folds, labels, k, split.val, spec.seed, groups)
    return train_test_with_val(labels, split.test, split.val, spec.seed, groups), folds
