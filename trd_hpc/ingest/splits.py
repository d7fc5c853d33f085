"""Splits of an ingested cohort: stratified by class at subject level, as for synthetic
cohorts, or additionally grouped by site (``site_column``) so that no site is in two
splits (or two folds).  An unlabelled cohort has no training data: every subject is in
``test`` (what ``predict`` reads by default)."""

from __future__ import annotations

import numpy as np

from trd_hpc.data.splits import stratified_folds, three_way_split, train_test_with_val
from trd_hpc.errors import IngestError


def _group_hold_out(ids: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """(rest, held): whole groups, about ``fraction`` of the subjects, class-stratified as far as groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    k = max(2, min(n_groups, int(round(1 / fraction))))
    if n_groups < 2:
        raise IngestError(f"site grouping needs at least 2 sites, the cohort has {n_groups}")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    rest, held = next(sgkf.split(np.zeros(len(ids)), labels, groups))
    return np.sort(ids[rest]), np.sort(ids[held])


def _group_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[list[int]]:
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < k:
        raise IngestError(f"{k} site-grouped folds need at least {k} sites, the cohort has {len(np.unique(groups))}")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [np.sort(held).tolist() for _, held in sgkf.split(np.zeros(len(labels)), labels, groups)]


def splits_for(spec, labels: np.ndarray, sites: list[str] | None):
    """(splits {train, val, test}, folds) of an ingested cohort."""
    n = len(labels)
    if (labels < 0).all():
        return {"train": [], "val": [], "test": list(range(n))}, []
    split = spec.split
    try:
        if sites is None:
            if spec.task == "emt":
                return three_way_split(labels, split.train, split.val, split.test, spec.seed), []
            return (
                train_test_with_val(labels, split.test, split.val, spec.seed),
                stratified_folds(labels, split.folds, spec.seed),
            )
        groups = np.unique(np.asarray(sites), return_inverse=True)[1]
        ids = np.arange(n)
        test_frac = split.test
        val_frac = split.val / (split.train + split.val) if spec.task == "emt" else split.val
        rest, test = _group_hold_out(ids, labels, groups, test_frac, spec.seed)
        train, val = _group_hold_out(rest, labels[rest], groups[rest], val_frac, spec.seed + 1)
        folds = _group_folds(labels, groups, split.folds, spec.seed) if spec.task == "cnn3d" else []
        return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}, folds
    except ValueError as e:
        raise IngestError(
            f"the {n} subjects cannot be split as the spec's split asks ({' '.join(str(e).split())}); "
            f"more subjects, other fractions or fewer folds"
        ) from None
