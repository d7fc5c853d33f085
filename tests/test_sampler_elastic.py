"""Elastic exact resume, sample by sample: an epoch stopped at one world size and continued at
another trains on every subject of the epoch once, none twice and none skipped (padding
entries, repeats that fill the last global batch, are marked and not counted), and at the same
world size the resumed ranks read exactly what the uninterrupted ones read."""

from __future__ import annotations

from collections import Counter

import pytest

from trd_hpc.data.sampler import ShardAwareSampler, decode

SHARDS = [16, 16, 11]  # 43 subjects: no world size here divides them


def _samplers(world: int, batch: int, accum: int, seed: int = 5) -> list[ShardAwareSampler]:
    return [
        ShardAwareSampler(SHARDS, num_replicas=world, rank=r, seed=seed, block=4, batch_size=batch, accum=accum)
        for r in range(world)
    ]


def _steps(samplers, batch: int, accum: int, steps: int | None, ledger: list) -> None:
    """Every rank takes ``steps`` optimiser steps (None: to the epoch's end) as the trainer
    does (``start`` advanced by the loaded batch), the real entries going to ``ledger``."""
    per_step = batch * accum
    k = 0
    while steps is None or k < steps:
        if len(samplers[0]) == 0:
            break
        for s in samplers:
            idx = s.rank_indices()[s.start : s.start + per_step]
            ledger.extend(p for p, pad in map(decode, idx.tolist()) if not pad)
            s.start += len(idx)
        k += 1


@pytest.mark.parametrize(
    "before,after,batch,accum,steps",
    [(2, 1, 4, 1, 3), (1, 2, 4, 1, 3), (1, 2, 4, 1, 5), (2, 3, 2, 2, 2), (3, 2, 3, 1, 1), (2, 1, 4, 2, 2)],
)
def test_elastic_resume_trains_on_every_subject_of_the_epoch_once(before, after, batch, accum, steps):
    ledger: list[int] = []
    first = _samplers(before, batch, accum)
    for s in first:
        s.set_epoch(3)
    _steps(first, batch, accum, steps, ledger)
    state = first[0].state_dict()  # what rank 0's checkpoint holds
    assert state["consumed"] == steps * before * batch * accum
    second = _samplers(after, batch, accum)
    for s in second:
        s.resume_at(state)
        assert s.epoch == 3
    _steps(second, batch, accum, None, ledger)
    seen = Counter(ledger)
    assert sorted(seen) == list(range(sum(SHARDS))), "a subject of the epoch was skipped"
    assert max(seen.values()) == 1, [p for p, c in seen.items() if c > 1]
    # the entries before the stop are the epoch order's first ones, whatever the world size
    order = first[0].epoch_order().tolist()
    assert sorted(ledger[: state["consumed"]]) == sorted(order[: state["consumed"]])


def test_elastic_resume_at_the_same_world_size_reads_what_the_uninterrupted_run_reads():
    whole = _samplers(2, 4, 1)
    for s in whole:
        s.set_epoch(1)
    part = _samplers(2, 4, 1)
    for s in part:
        s.set_epoch(1)
    _steps(part, 4, 1, 2, [])
    resumed = _samplers(2, 4, 1)
    for s, p in zip(resumed, part):
        s.load_state_dict(p.state_dict())
        assert list(s) == whole[s.rank].rank_indices()[8:].tolist()


def test_elastic_resume_twice_keeps_the_epoch_position():
    """2 ranks -> 1 -> 2 in one epoch: the offset travels in the checkpoint of the middle run."""
    ledger: list[int] = []
    a = _samplers(2, 2, 1)
    for s in a:
        s.set_epoch(0)
    _steps(a, 2, 1, 2, ledger)
    b = _samplers(1, 2, 1)
    b[0].resume_at(a[0].state_dict())
    _steps(b, 2, 1, 3, ledger)
    c = _samplers(2, 2, 1)
    for s in c:
        s.resume_at(b[0].state_dict())
    _steps(c, 2, 1, None, ledger)
    assert sorted(ledger) == list(range(sum(SHARDS)))
    c[0].set_epoch(1)  # the next epoch starts from its beginning
    assert c[0].offset == 0 and len(c[0]) == c[0].per_rank
