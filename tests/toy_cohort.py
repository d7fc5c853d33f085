"""A third cohort kind, added through the registry alone (used by tests/test_experiment.py):
a table of 4 standard-normal features per subject whose class is the sign of their sum."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from trd_hpc.cohort_config import ThreeWaySplit
from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.data.splits import three_way_split
from trd_hpc.sections import Strict

N_FEATURES = 4


class TableCohortConfig(Strict):
    kind: Literal["toy_table"] = "toy_table"
    n_subjects: int = Field(60, ge=12)
    seed: int = 0
    subjects_per_shard: int = Field(16, ge=1)
    split: ThreeWaySplit = Field(default_factory=ThreeWaySplit)


def _features(cfg: TableCohortConfig, index: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, index]).standard_normal(N_FEATURES).astype(np.float32)


def _make_subject(cfg: TableCohortConfig, index: int, bulk_out: np.ndarray) -> dict:
    bulk_out[...] = _features(cfg, index)
    return {"label": np.int64(bulk_out.sum() > 0)}


KIND = CohortKind(
    name="toy_table",
    config_class=TableCohortConfig,
    schema=lambda cfg: [
        Column("features", (N_FEATURES,), "float32", True),
        Column("label", (), "int64", False),
        Column("subject_id", (), "int64", False),
    ],
    label_column="label",
    class_names=lambda cfg: ["negative", "positive"],
    make_subject=_make_subject,
    predicted_labels=lambda cfg: np.array([int(_features(cfg, i).sum() > 0) for i in range(cfg.n_subjects)]),
    make_splits=lambda cfg, labels: (
        three_way_split(labels, cfg.split.train, cfg.split.val, cfg.split.test, cfg.seed),
        [],
    ),
    class_count_problem=lambda cfg, counts: None if counts.min() > 0 else f"a class is empty: {counts.tolist()}",
)
