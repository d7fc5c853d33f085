"""A distributed sampler that keeps reads inside shards and resumes mid-epoch.

Every epoch the split's positions are cut into runs of ``block`` consecutive
subjects inside one shard; the order of the runs and the order inside each run
are shuffled by (seed, epoch), the result is padded to a multiple of the world
size by repeating its first entries, and rank r takes the r-th contiguous
slice.  So ranks are disjoint, together cover the split once per epoch, and
each reads mostly neighbouring chunks of a few shards.

With gradient accumulation (``accum`` micro-batches per optimiser step) each
process stands for ``accum`` virtual ranks: step k of process r is the micro-
batches of virtual ranks r*accum .. r*accum+accum-1 of global batch k, in that
order.  So W processes accumulating A micro-batches see exactly the samples,
in exactly the groups, of W*A processes without accumulation.

Padding entries are yielded as ``-(position + 1)`` so the dataset can mark
them (``is_pad``) and evaluation can drop them.

Elastic resume: the epoch order depends on (seed, epoch) only, never on the world
size, and step k of an epoch consumes entries [k*G, (k+1)*G) of it (G the global
batch), so a checkpoint's position is one number, the entries consumed in all.  A
run resumed at another world size (``resume_at``) continues the same epoch from that
offset, its remaining entries striped over the new ranks: every subject of the epoch
is trained on once, none twice (``tests/test_sampler_elastic.py`` keeps the ledger).
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler


def decode(index: int) -> tuple[int, bool]:
    """(position, is_pad) of a sampler index."""
    return (-index - 1, True) if index < 0 else (index, False)


class ShardAwareSampler(Sampler[int]):
    def __init__(
        self,
        shard_sizes: list[int],
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        block: int = 16,
        drop_last: bool = False,
        batch_size: int | None = None,
        accum: int = 1,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.accum = max(1, int(accum))
        self.shard_sizes = [int(s) for s in shard_sizes]
        self.n = sum(self.shard_sizes)
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.block, self.drop_last = shuffle, seed, max(1, block), drop_last
        # With the per-rank batch size known, global batch k (of num_replicas x
        # batch_size entries of the epoch order) is striped over the ranks, so W
        # processes with batch b see the same samples per step as one with W*b.
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0  # samples of this rank's epoch already consumed (resume)
        self.offset = 0  # entries of the epoch order consumed at another world size (resume_at)

    @property
    def per_rank(self) -> int:
        """Entries of this epoch (after ``offset``) for each rank, padding included."""
        v, n = self.num_replicas * self.accum, self.n - self.offset  # virtual ranks, entries left
        return n // v * self.accum if self.drop_last else math.ceil(n / v) * self.accum

    @classmethod
    def for_dataset(cls, dataset, **kw) -> "ShardAwareSampler":
        return cls(dataset.shard_sizes(), **kw)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0
        self.offset = 0

    def epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        blocks = []
        base = 0
        for size in self.shard_sizes:
            for lo in range(0, size, self.block):
                blocks.append(np.arange(base + lo, base + min(lo + self.block, size), dtype=np.int64))
            base += size
        for b in blocks:
            rng.shuffle(b)
        order = rng.permutation(len(blocks))
        return np.concatenate([blocks[i] for i in order]) if blocks else np.zeros(0, np.int64)

    def rank_indices(self) -> np.ndarray:
        order = self.epoch_order()[self.offset :]
        total, n = self.per_rank * self.num_replicas, len(order)
        if total > n:
            pads = np.resize(order, total - n)  # repeats the first entries (cyclically)
            order = np.concatenate([order, -(pads + 1)])
        else:
            order = order[:total]
        v, a = self.num_replicas * self.accum, self.accum
        if not self.batch_size or v == 1:
            return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        b = self.batch_size
        full = len(order) // (v * b)
        mine = slice(self.rank * a, (self.rank + 1) * a)  # this process's virtual ranks
        head = order[: full * v * b].reshape(full, v, b)[:, mine, :].reshape(-1)
        tail = order[full * v * b :]
        t = len(tail) // v
        return np.concatenate([head, tail[self.rank * a * t : (self.rank + 1) * a * t]])

    def __iter__(self):
        idx = self.rank_indices()[self.start :]
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "start": self.start,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "offset": self.offset,
            "consumed": self.consumed(),
        }

    def consumed(self) -> int:
        """Entries of the epoch order consumed in all ranks: the offset this sampler started
        from and ``start`` per process of each of its steps (striped global batches)."""
        return min(self.n, self.offset + self.start * self.num_replicas)

    def resume_at(self, state: dict) -> None:
        """Continue an epoch saved by a sampler of possibly another world size: the same
        epoch, from the entry of its order where the saved run stopped."""
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        if "consumed" in state:
            consumed = int(state["consumed"])
        else:  # a checkpoint written before the offset was recorded
            consumed = int(state["start"]) * int(state.get("num_replicas", self.num_replicas))
        self.offset, self.start = min(max(consumed, 0), self.n), 0

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.start = int(state["start"])
        self.seed = int(state["seed"])
        self.offset = int(state.get("offset", 0))
