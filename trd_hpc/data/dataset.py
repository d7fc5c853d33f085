"""A torch Dataset over a cohort manifest.

* h5py files are opened lazily, in the process that reads (each DataLoader
  worker), and kept open: one handle per shard per worker, bounded by an LRU;
  a handle inherited through ``fork`` is never used (h5py is not fork-safe).
* ``__getitems__`` reads a whole batch straight into one preallocated tensor
  per column (in shared memory inside a worker, so handing the batch to the
  main process copies nothing), so the collate step is the identity.
* Items are dicts of tensors plus ``subject_id`` and ``is_pad``; bulk images
  keep their stored dtype (float16 fMRI halves the bytes moved; the trainer
  casts on the device).
* Workers: ``make_loader(worker_type="thread")`` (the default) reads ahead in threads of the
  training process into its reused buffers, overlapping the step's compute; the reads take
  turns (one lock: h5py serialises them anyway), so threads never pay the fresh shared memory
  that process workers hand over per batch. ``"process"`` is torch's DataLoader with worker
  processes, for CPU-heavy per-item work.
* Memory: one batch per worker plus per-shard scalars, never the cohort.
* Trust: when a process first opens a shard, the shard's own attributes must
  say it is the manifest's (seed, config, subject range: a shard copied in
  from another cohort is refused), and the rows this split reads must match
  their CRC-32 in the manifest (a flipped bit is refused naming the shard and
  the subject) before any of them reaches a batch.  That costs one extra read
  of the split per reading process; rows already checked in this process (or
  in the parent before a fork) are not read again.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trd_hpc.data.kinds import kind_of
from trd_hpc.data.manifest import Manifest, load_manifest
from trd_hpc.data.sampler import ShardAwareSampler, decode
from trd_hpc.data.shards import CohortError, ShardLayout, ShardReader, shard_content_checksum

_TORCH_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
_abandoned: list = []  # handles inherited through fork: never used, never closed here
# Rows whose checksums matched in this process, per shard file (and its content checksum).
_verified: dict[tuple, np.ndarray] = {}


def forget_verified() -> None:
    """Check every shard again on its next open in this process (benchmarks)."""
    _verified.clear()


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when inside a DataLoader worker."""
    if shared:
        try:
            numel = int(np.prod(shape, dtype=np.int64))
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(numel, device="cpu")
            return proto.new(storage).view(shape)
        except (AttributeError, RuntimeError):  # private API moved: fall back
            return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(shape, dtype=dtype)


class BufferPool:
    """Reuses batch buffers in the reading process once nobody holds them.

    Fresh memory costs a page fault per 4 KiB on first touch, which caps a
    loader at ~1.5 GB/s on a VM while a warm page cache reads at ~10 GB/s.  A
    buffer is free again when neither Python (the batch dict, a caller's
    variable) nor any tensor view or numpy array refers to it.
    """

    def __init__(self, per_key: int = 4):
        self.per_key = per_key
        self._bufs: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # reading threads: a buffer goes to one of them

    @staticmethod
    def _free(t: torch.Tensor) -> bool:
        # refs: the pool's list, the loop variable, getrefcount's argument, this frame's argument
        return sys.getrefcount(t) <= 4 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            bufs = self._bufs.setdefault((shape, dtype), [])
            for t in bufs:
                if self._free(t):
                    return t
            t = torch.empty(shape, dtype=dtype)
            if len(bufs) < self.per_key:
                bufs.append(t)
            return t


class CohortDataset(Dataset):
    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        normalize_volumes: bool = True,
        max_open_shards: int = 32,
        check_files: bool = True,
        verify: bool = True,
        prepare_with=None,
        complete: tuple[str, ...] = (),
    ):
        """``verify``: check the rows of this split against their checksums when a
        shard is first opened (see the module docstring); off only to measure its cost.
        ``prepare_with``: prepare batches as for that cohort config instead of this cohort's
        own (a model applied to new subjects standardises them with its training cohort's
        statistics: ``trd-hpc predict``).  ``complete``: only the split's subjects that have
        every modality named (``data.complete_cases``); the others' ids are ``left_out``."""
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        self.split = split
        try:
            ids = np.asarray(self.manifest.subjects(split), dtype=np.int64)
        except KeyError as e:
            raise CohortError(str(e.args[0])) from None
        self.ids = np.sort(ids)
        # the columns a batch holds (ids and affines kept for tracing are not read)
        self.cols = [c for c in self.manifest.columns if c.load]  # type: ignore[attr-defined]
        self.normalize_volumes = normalize_volumes
        self._prepare_cfg = self.manifest.config if prepare_with is None else prepare_with
        self._prepare = kind_of(self._prepare_cfg).prepare_batch
        self.max_open_shards = max_open_shards
        self.verify = verify
        self.virtual = self.manifest.virtual  # subjects regenerated when read, no shard files
        firsts = np.array([s["first_subject"] for s in self.manifest.shards], dtype=np.int64)
        self._shard_pos = np.searchsorted(firsts, self.ids, side="right") - 1
        self._row = self.ids - firsts[self._shard_pos]
        if check_files:
            self._check_files()
        self._pid = None
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        # per shard opened: offsets and scalars, a few KB, so a re-open skips HDF5 (ShardLayout)
        self._layouts: dict[int, ShardLayout] = {}
        self._pool = BufferPool()
        self._read_lock = threading.Lock()
        self.left_out = np.zeros(0, dtype=np.int64)
        if complete:
            self._keep_complete(tuple(complete))

    def _keep_complete(self, names: tuple[str, ...]) -> None:
        """Leave out the subjects whose ``present`` flag of any modality in ``names`` is 0
        (read through the verified readers, so a flag is checked before it decides)."""
        known = kind_of(self.manifest.config).modalities
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CohortError(
                f"data.complete_cases: {', '.join(unknown)} is not a modality of the {self.manifest.kind} cohort "
                f"{self.root} (its modalities: {', '.join(known) or 'none'})"
            )
        if not any(c.name == "present" for c in self.cols):
            return  # no subject of this cohort lacks a modality
        want = [known.index(n) for n in names]
        flags = np.empty(len(known), dtype=np.uint8)
        keep = np.ones(len(self.ids), dtype=bool)
        with self._read_lock:
            for p in np.lexsort((self._row, self._shard_pos)):
                self._reader(int(self._shard_pos[p])).read("present", int(self._row[p]), flags)
                keep[p] = bool(flags[want].all())
        if len(keep) and not keep.any():
            raise CohortError(
                f"data.complete_cases [{', '.join(names)}]: every one of the {len(keep)} subjects of split "
                f"'{self.split}' of {self.root} lacks one of them; nothing is left to train on"
            )
        self.left_out = self.ids[~keep]
        self.ids, self._shard_pos, self._row = self.ids[keep], self._shard_pos[keep], self._row[keep]

    def _check_files(self) -> None:
        if self.virtual:
            return
        for k in np.unique(self._shard_pos):
            s = self.manifest.shards[k]
            p = self.root / s["file"]
            if not p.exists():
                raise CohortError(f"{p}: shard named in {self.root / 'manifest.json'} is missing")
            if p.stat().st_size != s["bytes"]:
                raise CohortError(
                    f"{p}: size {p.stat().st_size} bytes, manifest says {s['bytes']} (truncated or replaced?); "
                    f"run `trd-hpc cohort validate {self.root}`"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def shard_sizes(self) -> list[int]:
        """Number of this split's subjects in each shard that holds some (in id order)."""
        _, counts = np.unique(self._shard_pos, return_counts=True)
        return counts.tolist()

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_readers"] = OrderedDict()
        d["_pid"] = None
        d["_pool"] = BufferPool()
        d["_read_lock"] = None  # not picklable; a fresh one in the worker
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._read_lock = threading.Lock()

    def _reader(self, k: int) -> ShardReader:
        if self._pid != os.getpid():
            if self._readers:
                _abandoned.append(self._readers)  # opened by the parent before a fork
            self._readers = OrderedDict()
            self._pid = os.getpid()
        r = self._readers.get(k)
        if r is None:
            s = self.manifest.shards[k]
            if self.virtual:
                from trd_hpc.data.virtual import VirtualShard

                r = VirtualShard(self.manifest.config, s["n_subjects"], s["first_subject"])
            else:
                r = self._open_shard(k)
            self._readers[k] = r
            if len(self._readers) > self.max_open_shards:
                _, old = self._readers.popitem(last=False)
                old.close()
        else:
            self._readers.move_to_end(k)
        return r

    def _open_shard(self, k: int) -> ShardReader:
        """Shard ``k`` opened, checked and (with ``verify``) its rows of this split verified;
        again from its recorded layout when this process opened the same file before."""
        s = self.manifest.shards[k]
        path = self.root / s["file"]
        layout = self._layouts.get(k)
        if layout is not None:
            r = ShardReader.reopen(path, self.manifest.config, s["n_subjects"], layout)
            if r is not None:
                return r  # the same file (device, inode, size, mtime) as when it was checked
            del self._layouts[k]
        r = ShardReader(path, self.manifest.config, s["n_subjects"], s["first_subject"])
        try:
            if self.verify:
                self._verify(k, r)
        except BaseException:
            r.close()
            raise
        layout = r.layout()
        if layout is not None:
            self._layouts[k] = layout
        return r

    def verify_all(self) -> None:
        """Check every shard this split reads now, in this process (CohortError naming
        the shard and subject).  Called before a DataLoader forks its workers, it also
        spares each worker the check (every epoch, when the workers are not persistent):
        they inherit its result.  No shard stays open."""
        if self.virtual:
            return
        for k in np.unique(self._shard_pos):
            s = self.manifest.shards[int(k)]
            r = ShardReader(self.root / s["file"], self.manifest.config, s["n_subjects"], s["first_subject"])
            try:
                self._verify(int(k), r)
            finally:
                r.close()

    def _verify(self, k: int, r: ShardReader) -> None:
        s = self.manifest.shards[k]
        st = os.fstat(r._fd) if r._fd is not None else os.stat(r.path)
        key = (os.path.realpath(r.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, s["checksum"])
        done = _verified.setdefault(key, np.zeros(s["n_subjects"], dtype=bool))
        rows = np.unique(self._row[self._shard_pos == k])
        todo = rows[~done[rows]]
        if not len(todo):
            return
        man = self.root / "manifest.json"
        crcs = s.get("row_crc32")
        if crcs is None:
            # A manifest written before per-subject checksums: the shard's own, once.
            if shard_content_checksum(r.path, self.manifest.config) != s["checksum"]:
                raise CohortError(
                    f"{r.path}: content does not match its checksum in {man} (changed or corrupt; this "
                    f"manifest predates per-subject checksums, so `trd-hpc cohort validate {self.root}` cannot "
                    f"name the subject either); regenerate the shard with `trd-hpc generate`"
                )
            done[:] = True
            return
        bad = r.bad_rows(todo, crcs)
        if bad:
            ids = ", ".join(str(s["first_subject"] + j) for j in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise CohortError(
                f"{r.path}: subject {ids} ({len(bad)} of the {len(todo)} checked) does not match its checksum in "
                f"{man} (changed or corrupt); no batch has used it. `trd-hpc generate` with the cohort's "
                f"config remakes the shard"
            )
        done[todo] = True

    def close(self) -> None:
        if self._pid == os.getpid():
            for r in self._readers.values():
                r.close()
        self._readers = OrderedDict()

    def __getitem__(self, index: int) -> dict:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict:
        shared = torch.utils.data.get_worker_info() is not None
        decoded = [decode(int(i)) for i in indices]
        pos = np.array([p for p, _ in decoded], dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(self.ids)):
            raise IndexError(f"position out of range 0..{len(self.ids) - 1} in split '{self.split}'")
        b = len(pos)
        out: dict[str, torch.Tensor] = {}
        arrays: dict[str, np.ndarray] = {}
        for c in self.cols:
            if c.chunked:
                shape, dtype = (b, *c.shape), _TORCH_DTYPES[c.dtype]
                # In a worker the batch goes to shared memory (no copy on hand-over);
                # in the reading process, pooled buffers avoid fresh-page faults.
                t = _alloc(shape, dtype, True) if shared else self._pool.get(shape, dtype)
                out[c.name] = t
                arrays[c.name] = t.numpy()
        scalars = {c.name: np.empty(b, dtype=c.dtype) for c in self.cols if not c.chunked}
        # Read in file order (shard, row) so the disk sees ascending offsets;
        # each row still lands in its shuffled batch position. One reading thread at a
        # time: the open-shard LRU may close a handle another thread would read from.
        with self._read_lock:
            for j in np.lexsort((self._row[pos], self._shard_pos[pos])):
                p = pos[j]
                r = self._reader(int(self._shard_pos[p]))
                row = int(self._row[p])
                for name, arr in arrays.items():
                    r.read(name, row, arr[j])
                for name, arr in scalars.items():
                    arr[j] = r.scalars[name][row]
        for name, arr in scalars.items():
            out[name] = torch.from_numpy(arr)
        out["is_pad"] = torch.tensor([pad for _, pad in decoded], dtype=torch.bool)
        if "subject_id" in out and not torch.equal(out["subject_id"], torch.from_numpy(self.ids[pos])):
            raise CohortError(f"{self.root}: subject ids in the shards do not match the manifest")
        if self._prepare is not None:  # the kind's own (volumes: normalised, channel axis, severity in [0, 1])
            out = self._prepare(self._prepare_cfg, out, self.normalize_volumes)
        return out


def collate_batched(batch):
    """``CohortDataset.__getitems__`` already returns a batch."""
    return batch


class ThreadLoader:
    """Batches of ``dataset`` in ``sampler``'s order, read ahead by ``num_workers`` threads.

    At most ``num_workers * prefetch_factor`` batches are in flight; each lands in one of the
    dataset's reused buffers (the pool grows to hold them), and the next read starts while the
    training step computes. A read's exception is raised, with its traceback, when its batch is
    due; leaving the loop early waits for the reads in flight (at most that many batches)."""

    def __init__(self, dataset, batch_size: int, sampler, num_workers: int, prefetch_factor: int = 2):
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.num_workers, self.depth = num_workers, num_workers * prefetch_factor
        pool = getattr(dataset, "_pool", None)
        if pool is not None:  # in flight, the one being used, the caller's previous one
            pool.per_key = max(pool.per_key, self.depth + 2)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _index_batches(self):
        it = iter(self.sampler)
        while chunk := list(itertools.islice(it, self.batch_size)):
            yield chunk

    def __iter__(self):
        batches = self._index_batches()
        read = self.dataset.__getitems__
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="trd-read") as pool:
            pending = deque(pool.submit(read, b) for b in itertools.islice(batches, self.depth))
            try:
                while pending:
                    batch = pending.popleft().result()
                    nxt = next(batches, None)
                    if nxt is not None:
                        pending.append(pool.submit(read, nxt))
                    yield batch
                    del batch  # its buffer is free for a later read once the caller drops it too
            finally:
                for f in pending:
                    f.cancel()


def make_loader(
    dataset: CohortDataset,
    batch_size: int,
    sampler: ShardAwareSampler,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    generator: torch.Generator | None = None,
    worker_type: str = "thread",
) -> DataLoader | ThreadLoader:
    """A loader over ``dataset`` in ``sampler``'s order: ``num_workers`` reading threads
    (``worker_type="thread"``, see ``ThreadLoader``) or torch's DataLoader with that many worker
    processes (``"process"``); with 0, torch's DataLoader reading in this process.

    ``generator`` seeds the workers; passing one (always, here) keeps the
    loader from drawing from torch's global RNG when an epoch starts, which
    would otherwise shift the dropout stream and break exact resume."""
    if num_workers > 0 and worker_type == "thread":
        return ThreadLoader(dataset, batch_size, sampler, num_workers, prefetch_factor)
    if worker_type not in ("thread", "process"):
        raise ValueError(f"worker_type must be 'thread' or 'process', not {worker_type!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kw = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batched,
        pin_memory=pin_memory,
        drop_last=False,
        generator=generator,
        **kw,
    )
