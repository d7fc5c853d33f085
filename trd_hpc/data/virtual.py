"""A virtual cohort's shard: subjects regenerated from (seed, *i*) when they are read.

``generate.write_virtual`` writes the manifest and splits of a cohort and no shard; the
dataset reads each "shard" through :class:`VirtualShard`, which has the interface of
``ShardReader`` and makes subject *i* with the kind's own ``make_subject``: the bytes the
generator would have written, so a virtual cohort is bit-identical to the sharded one of
the same config, with no disk at all (a 100k-subject EMT cohort would be 885 GB).  The
price is CPU: making a subject costs about what a cold read of it does, so loader
workers decide which is faster (``trd-hpc bench load --virtual``).
"""

from __future__ import annotations

import numpy as np

from trd_hpc.data.shards import make_subject, schema


class _Column:
    """A scalar column (label, subject_id, severity) of a virtual shard, row by row."""

    def __init__(self, shard: "VirtualShard", name: str):
        self.shard, self.name = shard, name

    def __getitem__(self, row: int):
        return self.shard.row(int(row))[self.name]


class VirtualShard:
    """Rows ``first .. first + n - 1`` of a generated cohort, made on demand.  Nothing is
    stored, so there is no checksum to verify (the dataset skips that for a virtual cohort).

    The dataset reads a subject's columns one after the other (the bulk image first):
    the last subject made is kept, so each subject is made once per read."""

    def __init__(self, cfg, n_subjects: int, first_subject: int):
        self.cfg, self.n, self.first = cfg, n_subjects, first_subject
        self.cols = schema(cfg)
        self.bulk = self.cols[0]
        self.scalars = {c.name: _Column(self, c.name) for c in self.cols if not c.chunked}
        self._row: int | None = None
        self._rest: dict = {}
        self._buf: np.ndarray | None = None  # only when a row is asked for without its image

    def row(self, j: int, bulk_out: np.ndarray | None = None) -> dict:
        """Subject row ``j``'s columns but the image (made into ``bulk_out`` or the reader's buffer)."""
        if not 0 <= j < self.n:
            raise IndexError(f"row {j} outside this shard's 0..{self.n - 1}")
        if j != self._row or bulk_out is not None:
            if bulk_out is None and self._buf is None:
                self._buf = np.empty(self.bulk.shape, dtype=self.bulk.dtype)
            buf = self._buf if bulk_out is None else bulk_out
            rest = make_subject(self.cfg, self.first + j, buf)
            rest["subject_id"] = np.int64(self.first + j)
            # the small columns only: keeping the image would pin the caller's batch buffer
            # (one per open shard: 32 batches of 106 MB at the paper's shapes)
            self._row, self._rest = j, rest
        return self._rest

    def read(self, name: str, j: int, out: np.ndarray) -> None:
        """Subject row ``j`` of chunked column ``name`` into ``out``."""
        if name == self.bulk.name:
            self.row(j, bulk_out=out)  # made straight into the batch
        else:
            out[...] = self.row(j)[name]

    def close(self) -> None:
        self._rest, self._row, self._buf = {}, None, None
