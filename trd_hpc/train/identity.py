"""What makes a checkpoint belong to a run: its config (less the keys that may
change on resume) and its cohort's content checksums.

Every checkpoint stores both; resuming compares them with the run being
resumed and refuses a mismatch naming the keys, so a same-shaped checkpoint
of another run (another learning rate, another cohort) is never continued
as if it were this one.
"""

from __future__ import annotations

import hashlib
import json

from trd_hpc.config import flatten, to_dict

# Keys that may change when a run is resumed (more epochs, another launcher or
# world size, logging); every other key must be the same.
# data.cohort may move: the cohort's content is checked by its checksums instead.
RESUMABLE_CHANGES = (
    "train.max_epochs",
    "train.strategy",
    "train.num_threads",
    "data.num_workers",
    "data.cohort",
    "data.generate",
    "data.prefetch_factor",
    "data.worker_type",
    "train.checkpoint_every_steps",
    "train.ledger",
    "train.log_every_steps",
    "tracking.",
)


def _resumable(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES)


def identity_keys(cfg) -> dict:
    """The flattened config keys that fix what a run computes."""
    flat = flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if not _resumable(k)}


def differing_keys(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not _resumable(k)]


def cohort_checksum(manifest) -> str:
    """One digest of the cohort's content: every shard's checksum and the splits."""
    h = hashlib.sha256()
    h.update(json.dumps([s.get("sha256") for s in manifest.shards]).encode())
    h.update(json.dumps(manifest.splits, sort_keys=True).encode())
    h.update(json.dumps(manifest.folds).encode())
    return h.hexdigest()


def run_identity(cfg, manifest) -> dict:
    keys = identity_keys(cfg)
    return {"config": keys, "cohort_sha256": cohort_checksum(manifest)}
