"""``manifest.json``: the index of a cohort directory.

It records the schema version, the full generator config, every shard (file,
subject-id range, count, content checksum, labels as a digit string), the
class counts and the subject-level splits (and folds for volume cohorts).
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trd_hpc.config import CohortConfig, ConfigError, EMTCohortConfig, validate_cohort
from trd_hpc.data.shards import SCHEMA_VERSION, CohortError, schema
from trd_hpc.data.splits import fold_parts

MANIFEST = "manifest.json"


def class_names(cfg: CohortConfig) -> list[str]:
    if isinstance(cfg, EMTCohortConfig):
        from trd_hpc.data.emt_cohort import CLASS_NAMES

        return list(CLASS_NAMES)
    return list(cfg.class_names)


@dataclass
class Manifest:
    root: Path
    config: CohortConfig
    shards: list[dict]
    splits: dict[str, list[int]]
    folds: list[list[int]] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def n_subjects(self) -> int:
        return sum(s["n_subjects"] for s in self.shards)

    @property
    def kind(self) -> str:
        return self.config.kind

    def labels(self) -> np.ndarray:
        return np.frombuffer("".join(s["labels"] for s in self.shards).encode(), dtype=np.uint8) - ord("0")

    def shard_of(self, subject: int) -> tuple[int, int]:
        """(shard position, row inside the shard) of a subject id."""
        firsts = [s["first_subject"] for s in self.shards]
        k = bisect.bisect_right(firsts, subject) - 1
        if k < 0 or subject >= firsts[k] + self.shards[k]["n_subjects"]:
            raise KeyError(f"subject {subject} is not in cohort {self.root}")
        return k, subject - firsts[k]

    def subjects(self, split: str) -> list[int]:
        """Subject ids of a split: train | val | test | all | fold:K (held-out fold K)
        | fold:K:train | fold:K:val | fold:K:test."""
        if split == "all":
            return list(range(self.n_subjects))
        if split in self.splits:
            return list(self.splits[split])
        parts = split.split(":")
        if parts[0] == "fold" and len(parts) in (2, 3) and parts[1].isdigit() and self.folds:
            k = int(parts[1])
            if len(parts) == 2:
                if k >= len(self.folds):
                    raise KeyError(f"fold {k} does not exist in {self.root / MANIFEST} (folds 0..{len(self.folds) - 1})")
                return list(self.folds[k])
            if parts[2] in ("train", "val", "test"):
                val = getattr(self.config.split, "val", 0.15)
                return fold_parts(self.folds, self.labels(), k, val, self.config.seed)[parts[2]]
        valid = sorted(self.splits) + ["all"] + (["fold:K", "fold:K:train|val|test"] if self.folds else [])
        raise KeyError(f"unknown split '{split}' for cohort {self.root}; valid: {', '.join(valid)}")


def write_manifest(root: Path, data: dict) -> None:
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise CohortError(f"{root}: cohort directory does not exist")
    if not path.is_file():
        raise CohortError(f"{path}: no manifest (run `trd-hpc generate ... --out {root}` or `--finalize`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CohortError(f"{path}: not valid JSON: {e}") from None
    v = data.get("schema_version")
    if v != SCHEMA_VERSION:
        raise CohortError(f"{path}: field 'schema_version' is {v!r}; this version of trd-hpc reads {SCHEMA_VERSION}")
    for key in ("config", "shards", "splits"):
        if key not in data:
            raise CohortError(f"{path}: field '{key}' is missing")
    try:
        cfg = validate_cohort(data["config"], f"{path} field 'config'")
    except ConfigError as e:
        raise CohortError(str(e)) from None
    m = Manifest(root, cfg, data["shards"], data["splits"], data.get("folds", []), data)
    m.columns = schema(cfg)  # type: ignore[attr-defined]
    return m
