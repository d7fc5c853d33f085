"""Subject-level stratified splits and folds (scikit-learn), from labels and a seed.

``groups`` (an ingested cohort's sites): whole groups go to one side of every split and to
one fold (``StratifiedGroupKFold``, as stratified as whole groups allow), so no site is in
both the training and the test data.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from trd_hpc.errors import CohortError


def _split(
    ids: np.ndarray, labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) with ``held`` a stratified ``fraction`` of ``ids`` (whole groups when given)."""
    if groups is None:
        rest, held = train_test_split(ids, test_size=fraction, stratify=labels, random_state=seed, shuffle=True)
        return np.sort(rest), np.sort(held)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"holding out whole groups needs at least 2, these subjects come from {n_groups}")
    k = max(2, min(n_groups, int(round(1 / fraction))))
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    rest, held = next(sgkf.split(np.zeros(len(ids)), labels, groups))
    return np.sort(ids[rest]), np.sort(ids[held])


def _sub(groups, idx):
    return None if groups is None else np.asarray(groups)[idx]


def three_way_split(
    labels: np.ndarray, train: float, val: float, test: float, seed: int, groups=None
) -> dict[str, list[int]]:
    ids = np.arange(len(labels))
    rest, test_ids = _split(ids, labels, test, seed, groups)
    train_ids, val_ids = _split(rest, labels[rest], val / (train + val), seed + 1, _sub(groups, rest))
    return {"train": train_ids.tolist(), "val": val_ids.tolist(), "test": test_ids.tolist()}


def train_test_with_val(labels: np.ndarray, test: float, val: float, seed: int, groups=None) -> dict[str, list[int]]:
    """Paper 001: an 85/15 train/test split; ``val`` of the training part is held
    out for early stopping and the LR plateau."""
    ids = np.arange(len(labels))
    rest, test_ids = _split(ids, labels, test, seed, groups)
    train_ids, val_ids = _split(rest, labels[rest], val, seed + 1, _sub(groups, rest))
    return {"train": train_ids.tolist(), "val": val_ids.tolist(), "test": test_ids.tolist()}


def stratified_folds(labels: np.ndarray, k: int, seed: int, groups=None) -> list[list[int]]:
    """k disjoint stratified folds covering every subject once."""
    if groups is None:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = skf.split(np.zeros(len(labels)), labels)
    else:
        if len(np.unique(groups)) < k:
            raise ValueError(f"{k} folds of whole groups need at least {k} groups, there are {len(np.unique(groups))}")
        parts = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups
        )
    return [np.sort(held).tolist() for _, held in parts]


def fold_parts(
    folds: list[list[int]], labels: np.ndarray, k: int, val: float, seed: int, groups=None
) -> dict[str, list[int]]:
    """Fold ``k`` as a run: test = fold k; the other folds give train and val."""
    if not 0 <= k < len(folds):
        raise CohortError(f"fold {k} does not exist: the cohort has folds 0..{len(folds) - 1}")
    test_ids = np.asarray(folds[k])
    rest = np.sort(np.concatenate([np.asarray(f) for i, f in enumerate(folds) if i != k]))
    train_ids, val_ids = _split(rest, labels[rest], val, seed + 100 + k, _sub(groups, rest))
    return {"train": train_ids.tolist(), "val": val_ids.tolist(), "test": test_ids.tolist()}
