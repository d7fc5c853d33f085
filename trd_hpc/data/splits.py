"""Subject-level stratified splits and folds (scikit-learn), from labels and a seed."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from trd_hpc.errors import CohortError


def _split(ids: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) with ``held`` a stratified ``fraction`` of ``ids``."""
    rest, held = train_test_split(ids, test_size=fraction, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(rest), np.sort(held)


def three_way_split(labels: np.ndarray, train: float, val: float, test: float, seed: int) -> dict[str, list[int]]:
    ids = np.arange(len(labels))
    rest, test_ids = _split(ids, labels, test, seed)
    train_ids, val_ids = _split(rest, labels[rest], val / (train + val), seed + 1)
    return {"train": train_ids.tolist(), "val": val_ids.tolist(), "test": test_ids.tolist()}


def train_test_with_val(labels: np.ndarray, test: float, val: float, seed: int) -> dict[str, list[int]]:
    """Paper 001: an 85/15 train/test split; ``val`` of the training part is held
    out for early stopping and the LR plateau."""
    ids = np.arange(len(labels))
    rest, test_ids = _split(ids, labels, test, seed)
    train_ids, val_ids = _split(rest, labels[rest], val, seed + 1)
    return {"train": train_ids.tolist(), "val": val_ids.tolist(), "test": test_ids.tolist()}


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[list[int]]:
    """k disjoint stratified folds covering every subject once."""
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [np.sort(held).tolist() for _, held in skf.split(np.zeros(len(labels)), labels)]


def fold_parts(folds: list[list[int]], labels: np.ndarray, k: int, val: float, seed: int) -> dict[str, list[int]]:
    """Fold ``k`` as a run: test = fold k; the other folds give train and val."""
    if not 0 <= k < len(folds):
        raise CohortError(f"fold {k} does not exist: the cohort has folds 0..{len(folds) - 1}")
    test_ids = np.asarray(folds[k])
    rest = np.sort(np.concatenate([np.asarray(f) for i, f in enumerate(folds) if i != k]))
    train_ids, val_ids = _split(rest, labels[rest], val, seed + 100 + k)
    return {"train": train_ids.tolist(), "val": val_ids.tolist(), "test": test_ids.tolist()}
