"""One HDF5 file per shard: schema, writer, reader and content checksum.

Layout of a shard (readable by h5dump / h5ls; no custom filters):

* one plain dataset per modality, first axis = subject; the per-subject arrays
  (fMRI, SNPs, clinical, volumes) are chunked one subject per chunk and stored
  uncompressed (the noise does not compress: ratio <= 1.16 at 3-40x the cost);
  the scalar columns (label, severity, subject_id) are small contiguous arrays;
* file attributes: schema_version, kind, seed, the generator config as JSON,
  the shard index and subject range.

The checksum is over content, not file bytes: sha256 of the per-dataset sha256
digests, each over that dataset's raw bytes in subject order.  It survives an
``h5repack`` and catches any changed voxel; a broken HDF5 structure is caught
when the file is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from trd_hpc.config import CohortConfig, EMTCohortConfig, VolumeCohortConfig, to_dict

SCHEMA_VERSION = 1


from trd_hpc.errors import CohortError  # noqa: E402


@dataclass(frozen=True)
class Column:
    name: str
    shape: tuple[int, ...]  # per subject
    dtype: str
    chunked: bool  # one subject per chunk (the per-subject arrays)


def schema(cfg: CohortConfig) -> list[Column]:
    """The datasets of a shard, in checksum order; the first one is the bulk image."""
    if isinstance(cfg, EMTCohortConfig):
        return [
            Column("fmri", tuple(cfg.fmri.shape), cfg.fmri.dtype, True),
            Column("snp", (cfg.snp.n_snps,), "uint8", True),
            Column("clinical", (len(cfg.clinical.names),), "float32", True),
            Column("label", (), "int64", False),
            Column("subject_id", (), "int64", False),
        ]
    if isinstance(cfg, VolumeCohortConfig):
        return [
            Column("volume", tuple(cfg.shape), "float32", True),
            Column("response", (), "int64", False),
            Column("severity", (), "float32", False),
            Column("subject_id", (), "int64", False),
        ]
    raise TypeError(f"unknown cohort config {type(cfg).__name__}")


def label_column(cfg: CohortConfig) -> str:
    return "label" if isinstance(cfg, EMTCohortConfig) else "response"


def make_subject(cfg: CohortConfig, index: int, bulk_out: np.ndarray) -> dict:
    """Generate subject ``index`` into ``bulk_out``; return its other columns."""
    if isinstance(cfg, EMTCohortConfig):
        from trd_hpc.data.emt_cohort import make_emt_subject

        r = make_emt_subject(cfg, index, bulk_out)
        return {"snp": r["snp"], "clinical": r["clinical"], "label": r["label"]}
    from trd_hpc.data.volume_cohort import make_volume_subject

    return make_volume_subject(cfg, index, bulk_out)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def sidecar_name(index: int) -> str:
    return f".shard-{index:05d}.json"


class ContentHasher:
    def __init__(self, columns: list[Column]):
        self._h = {c.name: hashlib.sha256() for c in columns}
        self._order = [c.name for c in columns]

    def update(self, name: str, data) -> None:
        self._h[name].update(memoryview(np.ascontiguousarray(data)).cast("B"))

    def hexdigest(self) -> str:
        top = hashlib.sha256()
        for name in self._order:
            top.update(self._h[name].digest())
        return "sha256:" + top.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(
    cfg: CohortConfig,
    out_dir: Path,
    shard_index: int,
    first: int,
    stop: int,
    on_subject: Callable[[int], None] | None = None,
) -> dict:
    """Write subjects [first, stop) to ``shard-NNNNN.h5`` (five-digit shard index) and its sidecar record.

    The file is written under a temporary name and renamed only when complete
    and synced, so a killed writer leaves no file that looks finished.
    Generation (numpy/torch, GIL released) overlaps the HDF5 write and the
    hashing, which run in a second thread.
    """
    out_dir = Path(out_dir)
    cols = schema(cfg)
    bulk = cols[0]
    n = stop - first
    final = out_dir / shard_name(shard_index)
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    hasher = ContentHasher(cols)
    small = {c.name: np.empty((n, *c.shape), dtype=c.dtype) for c in cols[1:]}
    bulk_bytes = int(np.prod(bulk.shape)) * np.dtype(bulk.dtype).itemsize

    f = h5py.File(tmp, "w", libver="earliest")
    try:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["kind"] = cfg.kind
        f.attrs["seed"] = cfg.seed
        f.attrs["generator_config"] = json.dumps(to_dict(cfg), sort_keys=True)
        f.attrs["shard_index"] = shard_index
        f.attrs["first_subject"] = first
        f.attrs["n_subjects"] = n
        dsets = {}
        for c in cols:
            kw = dict(chunks=(1, *c.shape)) if c.chunked else {}
            dsets[c.name] = f.create_dataset(c.name, shape=(n, *c.shape), dtype=c.dtype, track_times=False, **kw)

        # Double buffering: the generator fills one buffer while the writer
        # thread writes and hashes the other.
        free: queue.Queue = queue.Queue()
        for _ in range(2):
            free.put(np.empty(bulk.shape, dtype=bulk.dtype))
        todo: queue.Queue = queue.Queue(maxsize=2)
        failure: list[BaseException] = []

        def writer() -> None:
            try:
                while True:
                    item = todo.get()
                    if item is None:
                        return
                    j, buf = item
                    dsets[bulk.name].id.write_direct_chunk((j,) + (0,) * len(bulk.shape), buf)
                    hasher.update(bulk.name, buf)
                    free.put(buf)
                    if on_subject:
                        on_subject(bulk_bytes)
            except BaseException as e:  # surfaced in the generating thread
                failure.append(e)
                free.put(np.empty(bulk.shape, dtype=bulk.dtype))

        t = threading.Thread(target=writer, name=f"shard-{shard_index}-writer", daemon=True)
        t.start()
        try:
            for j, i in enumerate(range(first, stop)):
                buf = free.get()
                if failure:
                    break
                rest = make_subject(cfg, i, buf)
                rest["subject_id"] = np.int64(i)
                for name, arr in small.items():
                    arr[j] = rest[name]
                todo.put((j, buf))
        finally:
            todo.put(None)
            t.join()
        if failure:
            raise failure[0]
        for c in cols[1:]:
            dsets[c.name][...] = small[c.name]
            hasher.update(c.name, small[c.name])
        f.flush()
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    f.close()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    record = {
        "file": final.name,
        "shard_index": shard_index,
        "first_subject": first,
        "n_subjects": n,
        "bytes": tmp.stat().st_size,
        "checksum": hasher.hexdigest(),
        "labels": "".join(map(str, small[label_column(cfg)].astype(int).tolist())),
        "config_fingerprint": config_fingerprint(cfg),
    }
    os.replace(tmp, final)
    _atomic_write_text(out_dir / sidecar_name(shard_index), json.dumps(record))
    return record


def config_fingerprint(cfg: CohortConfig) -> str:
    """Identity of what a shard holds: the cohort config minus the shard size."""
    d = to_dict(cfg)
    d.pop("subjects_per_shard", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- reading
def open_shard(path: Path, rdcc_nbytes: int = 0) -> h5py.File:
    """Open a shard read-only with a clear error for a missing or broken file."""
    path = Path(path)
    if not path.exists():
        raise CohortError(f"{path}: shard file is missing")
    try:
        # The per-subject chunks are read whole; HDF5's chunk cache would only add a copy.
        return h5py.File(path, "r", rdcc_nbytes=rdcc_nbytes)
    except OSError as e:
        raise CohortError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None


def check_shard_layout(f: h5py.File, path: Path, cfg: CohortConfig, n_expected: int) -> None:
    """Schema version, datasets, shapes and dtypes; raises CohortError naming the file."""
    v = f.attrs.get("schema_version")
    if v is None or int(v) != SCHEMA_VERSION:
        raise CohortError(f"{path}: schema_version {v} is not the supported {SCHEMA_VERSION}")
    for c in schema(cfg):
        if c.name not in f:
            raise CohortError(f"{path}: dataset '{c.name}' is missing")
        d = f[c.name]
        want = (n_expected, *c.shape)
        if tuple(d.shape) != want:
            raise CohortError(f"{path}: dataset '{c.name}' has shape {tuple(d.shape)}, expected {want}")
        if d.dtype != np.dtype(c.dtype):
            raise CohortError(f"{path}: dataset '{c.name}' has dtype {d.dtype}, expected {c.dtype}")


def shard_content_checksum(path: Path, cfg: CohortConfig) -> str:
    """Recompute a shard's content checksum (reads every byte)."""
    cols = schema(cfg)
    hasher = ContentHasher(cols)
    with open_shard(path) as f:
        for c in cols:
            d = f[c.name]
            if c.chunked:
                buf = np.empty((1, *c.shape), dtype=c.dtype)
                for j in range(d.shape[0]):
                    d.read_direct(buf, np.s_[j : j + 1], np.s_[0:1])
                    hasher.update(c.name, buf)
            else:
                hasher.update(c.name, d[...])
    return hasher.hexdigest()


class ShardReader:
    """Per-process reader of one shard.

    Each per-subject array is one uncompressed chunk, so it is read with a
    single ``os.preadv`` straight into the caller's buffer at the byte offset
    HDF5 reports for that chunk: the same bytes h5py would return, without
    its intermediate copies.  Filtered (compressed) shards fall back to h5py.
    The scalar columns of the shard (8 bytes a subject) are read once.
    """

    def __init__(self, path: Path, cfg: CohortConfig, n_subjects: int):
        self.path = Path(path)
        self.cols = schema(cfg)
        self.file = open_shard(self.path)
        check_shard_layout(self.file, self.path, cfg, n_subjects)
        self.n = n_subjects
        self.chunked = [c for c in self.cols if c.chunked]
        self._nbytes = {c.name: int(np.prod(c.shape)) * np.dtype(c.dtype).itemsize for c in self.chunked}
        self._offsets: dict[str, list[int] | None] = {c.name: self._chunk_offsets(c) for c in self.chunked}
        direct = any(o is not None for o in self._offsets.values())
        self._fd = os.open(self.path, os.O_RDONLY) if direct else None
        self.scalars = {c.name: self.file[c.name][...] for c in self.cols if not c.chunked}

    def _chunk_offsets(self, c: Column) -> list[int] | None:
        d = self.file[c.name]
        if d.id.get_create_plist().get_nfilters():
            return None
        offs = []
        for j in range(self.n):
            info = d.id.get_chunk_info_by_coord((j,) + (0,) * len(c.shape))
            if info.byte_offset is None or info.size != self._nbytes[c.name]:
                return None
            offs.append(info.byte_offset)
        return offs

    def read(self, name: str, j: int, out: np.ndarray) -> None:
        """Subject row ``j`` of chunked column ``name`` into ``out`` (C-contiguous)."""
        offs = self._offsets[name]
        if offs is not None:
            got = os.preadv(self._fd, [memoryview(out).cast("B")], offs[j])
            if got != self._nbytes[name]:
                raise CohortError(
                    f"{self.path}: short read of '{name}' row {j} ({got} of {self._nbytes[name]} bytes); truncated?"
                )
        else:
            self.file[name].read_direct(out[None], np.s_[j : j + 1], np.s_[0:1])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
