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
when the file is opened.  Each subject also gets a CRC-32 over its row of every
dataset (``row_crc32`` in the sidecar and the manifest): the loader checks the
rows it will read the first time a process opens a shard, so a corrupt subject
is named before training sees it, at the cost of one extra read per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from trd_hpc import faults
from trd_hpc.config import CohortConfig, ConfigError, to_dict, validate_cohort
from trd_hpc.data.kinds import Column, kind_of
from trd_hpc.errors import CohortError  # re-exported: a cohort file is missing, corrupt or foreign
from trd_hpc.fsio import atomic_path, atomic_write_json

SCHEMA_VERSION = 1


def schema(cfg: CohortConfig) -> list[Column]:
    """The datasets of a shard, in checksum order; the first one is the bulk image."""
    return kind_of(cfg).schema(cfg)


def label_column(cfg: CohortConfig) -> str:
    return kind_of(cfg).label_column


def make_subject(cfg: CohortConfig, index: int, bulk_out: np.ndarray) -> dict:
    """Generate subject ``index`` into ``bulk_out``; return its other columns."""
    return kind_of(cfg).make_subject(cfg, index, bulk_out)


def encode_labels(labels) -> str:
    """A shard's labels as one digit per subject ('?' for an unlabelled subject)."""
    return "".join("?" if v < 0 else str(v) for v in np.asarray(labels).astype(int).tolist())


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


def _row_bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")


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
    final = out_dir / shard_name(shard_index)
    # The temporary name carries host and pid (fsio.temp_name), so a later run removes
    # it only once its writer is dead; a failed write (full disk) removes it at once.
    stamp = kind_of(cfg).source_stamp
    sources = [s for _, s in stamp(cfg, first, stop)] if stamp is not None else None  # before reading them
    with atomic_path(final, fault="shard") as tmp:
        hasher, small, bulk_crc = _write_shard_file(cfg, tmp, shard_index, first, stop, on_subject)
    cols = schema(cfg)
    # Chain each subject's bulk CRC with its other columns (schema order: bulk first).
    crcs = []
    for j in range(stop - first):
        crc = bulk_crc[j]
        for c in cols[1:]:
            crc = zlib.crc32(_row_bytes(small[c.name][j : j + 1]), crc)
        crcs.append(crc)
    record = {
        "file": final.name,
        "shard_index": shard_index,
        "first_subject": first,
        "n_subjects": stop - first,
        "bytes": final.stat().st_size,
        "checksum": hasher.hexdigest(),
        "labels": encode_labels(small[label_column(cfg)]),
        "config_fingerprint": config_fingerprint(cfg),
        "row_crc32": crcs,
    }
    if sources is not None:
        record["sources"] = sources
    atomic_write_json(out_dir / sidecar_name(shard_index), record, indent=None)
    return record


def _write_shard_file(cfg, tmp: Path, shard_index: int, first: int, stop: int, on_subject):
    cols = schema(cfg)
    bulk = cols[0]
    n = stop - first
    hasher = ContentHasher(cols)
    small = {c.name: np.empty((n, *c.shape), dtype=c.dtype) for c in cols[1:]}
    bulk_crc = [0] * n
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
                    bulk_crc[j] = zlib.crc32(_row_bytes(buf))
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
                faults.point("shard-subject", shard_index, j)
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
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(Exception):  # the first error is the one to report
            f.close()
        raise _as_oserror(e) from e
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        raise
    try:
        f.close()  # then atomic_path syncs and renames (or removes) the temporary file
    except (OSError, RuntimeError) as e:
        raise _as_oserror(e) from e
    return hasher, small, bulk_crc


def _as_oserror(e: Exception) -> OSError:
    """h5py reports a failed write (disk full, file size limit) as an OSError or, at
    close, a RuntimeError, with HDF5's multi-line text as its message; an OSError of
    just the errno makes the WriteError one line that says what happened."""
    m = re.search(r"errno = (\d+)", str(e))
    code = int(m.group(1)) if m else getattr(e, "errno", None)
    if code:
        return OSError(code, os.strerror(code))
    return OSError(" ".join(str(e).split()))


def config_fingerprint(cfg: CohortConfig) -> str:
    """Identity of what a shard holds: the cohort config minus the shard size."""
    d = to_dict(cfg)
    d.pop("subjects_per_shard", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def diff_keys(a, b, prefix: str = "") -> list[str]:
    """``key (A on disk, B asked)`` for every leaf where the two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} on disk, {b!r} asked)"]


def normalized_config(raw) -> dict | None:
    """A stored cohort config as this version would write it (defaults of keys added
    since filled in), or None when it is not a valid cohort config."""
    if not isinstance(raw, dict):
        return None
    try:
        return to_dict(validate_cohort(raw))
    except (ConfigError, TypeError, ValueError):
        return None


def config_diffs(raw, cfg: CohortConfig, prefix: str = "cohort.") -> list[str]:
    """How a stored config differs from ``cfg`` (the shard size excluded)."""
    have = normalized_config(raw)
    if have is None:
        return [f"{prefix[:-1]} (not a valid cohort config on disk)"]
    want = to_dict(cfg)
    have.pop("subjects_per_shard", None)
    want.pop("subjects_per_shard", None)
    return diff_keys(have, want, prefix)


def foreign_reason(f: h5py.File, cfg: CohortConfig) -> str | None:
    """Why an open shard was not made with ``cfg`` (another seed or config, not a
    trd-hpc shard), from its own attributes; None when it was."""
    a = f.attrs
    if "generator_config" not in a or "seed" not in a:
        return "has no trd-hpc attributes (seed, generator_config): not a shard of a trd-hpc cohort"
    try:
        raw = json.loads(a["generator_config"])
    except (TypeError, ValueError):
        return "its generator_config attribute is not JSON"
    if int(a["seed"]) != cfg.seed:
        return f"was made with seed {int(a['seed'])}, not {cfg.seed} (a shard of another cohort)"
    diffs = config_diffs(raw, cfg)
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        return f"was made with another config ({'; '.join(diffs[:3])}{more}): a shard of another cohort"
    return None


def check_shard_identity(
    f: h5py.File, path: Path, cfg: CohortConfig, first: int, n: int, source: str = "the manifest"
) -> None:
    """The shard's own attributes say it holds subjects [first, first + n) of ``cfg``."""
    why = foreign_reason(f, cfg)
    if why:
        raise CohortError(f"{path}: {why}; {source} is for seed {cfg.seed}")
    have = (int(f.attrs.get("first_subject", -1)), int(f.attrs.get("n_subjects", -1)))
    if have != (first, n):
        raise CohortError(
            f"{path}: holds subjects {have[0]}..{have[0] + have[1] - 1} by its attributes, "
            f"{source} says {first}..{first + n - 1} (a shard of another layout?)"
        )


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


def shard_row_crcs(path: Path, cfg: CohortConfig, n_subjects: int) -> list[int]:
    """The per-subject CRC-32s of a shard file as it is now (a manifest's ``row_crc32``);
    for tests that plant a value the checksums must not catch (a NaN "generated")."""
    r = ShardReader(path, cfg, n_subjects)
    try:
        return r.row_crcs(range(n_subjects))
    finally:
        r.close()


@dataclass(frozen=True)
class ShardLayout:
    """What a checked, directly readable shard needs to be read again: its file's identity,
    every chunk's byte offset and the scalar columns.  Kept by the dataset for each shard it
    has opened, so re-opening a shard the open-shard LRU closed is one ``os.open`` and one
    ``fstat`` instead of an HDF5 open, the layout checks and a chunk lookup per subject (at
    100k subjects over hundreds of shards, the LRU re-opens shards all the time)."""

    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    offsets: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ShardReader:
    """Per-process reader of one shard.

    Each per-subject array is one uncompressed chunk, so it is read with a
    single ``os.preadv`` straight into the caller's buffer at the byte offset
    HDF5 reports for that chunk: the same bytes h5py would return, without
    its intermediate copies.  Such a shard's HDF5 handle is closed once the
    offsets are known (only the file descriptor stays open); filtered
    (compressed) shards keep it and are read through h5py.  The scalar
    columns of the shard (8 bytes a subject) are read once.
    """

    def __init__(self, path: Path, cfg: CohortConfig, n_subjects: int, first_subject: int | None = None):
        """``first_subject`` given: the shard's attributes must match it and ``cfg``."""
        self.path = Path(path)
        self.cols = schema(cfg)
        self.file: h5py.File | None = open_shard(self.path)
        try:
            check_shard_layout(self.file, self.path, cfg, n_subjects)
            if first_subject is not None:
                check_shard_identity(self.file, self.path, cfg, first_subject, n_subjects)
        except BaseException:
            self.file.close()
            raise
        self.n = n_subjects
        self.chunked = [c for c in self.cols if c.chunked]
        self._nbytes = {c.name: int(np.prod(c.shape)) * np.dtype(c.dtype).itemsize for c in self.chunked}
        self._offsets: dict[str, list[int] | None] = {c.name: self._chunk_offsets(c) for c in self.chunked}
        direct = any(o is not None for o in self._offsets.values())
        self._fd = os.open(self.path, os.O_RDONLY) if direct else None
        self.scalars = {c.name: self.file[c.name][...] for c in self.cols if not c.chunked}
        if all(o is not None for o in self._offsets.values()):
            self.file.close()  # every read goes through the descriptor
            self.file = None

    @classmethod
    def reopen(cls, path: Path, cfg: CohortConfig, n_subjects: int, layout: ShardLayout) -> "ShardReader | None":
        """A reader from a layout recorded earlier, or None when the file is no longer the
        one it was recorded from (replaced or rewritten: open it afresh, with its checks)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        if _identity(os.fstat(fd)) != layout.identity:
            os.close(fd)
            return None
        r = cls.__new__(cls)
        r.path, r.cols, r.file, r.n, r._fd = Path(path), schema(cfg), None, n_subjects, fd
        r.chunked = [c for c in r.cols if c.chunked]
        r._nbytes = {c.name: int(np.prod(c.shape)) * np.dtype(c.dtype).itemsize for c in r.chunked}
        r._offsets = dict(layout.offsets)
        r.scalars = layout.scalars
        return r

    def layout(self) -> ShardLayout | None:
        """This reader's layout, when every chunked column is read directly (else None)."""
        if self.file is not None or self._fd is None:
            return None
        offsets = {k: np.asarray(v, dtype=np.int64) for k, v in self._offsets.items()}
        return ShardLayout(_identity(os.fstat(self._fd)), offsets, self.scalars)

    def _chunk_offsets(self, c: Column) -> list[int] | None:
        d = self.file[c.name]
        if d.id.get_create_plist().get_nfilters():
            return None
        if hasattr(d.id, "chunk_iter"):  # HDF5 >= 1.12.3: every chunk in one call (a lookup each costs 15 us)
            offs = np.full(self.n, -1, dtype=np.int64)
            sizes = np.zeros(self.n, dtype=np.int64)

            def visit(info) -> None:
                j = info.chunk_offset[0]
                if 0 <= j < self.n and info.byte_offset is not None:
                    offs[j], sizes[j] = info.byte_offset, info.size

            d.id.chunk_iter(visit)
            return offs.tolist() if (offs >= 0).all() and (sizes == self._nbytes[c.name]).all() else None
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
            got = os.preadv(self._fd, [memoryview(out).cast("B")], int(offs[j]))
            if got != self._nbytes[name]:
                raise CohortError(
                    f"{self.path}: short read of '{name}' row {j} ({got} of {self._nbytes[name]} bytes); truncated?"
                )
        else:
            self.file[name].read_direct(out[None], np.s_[j : j + 1], np.s_[0:1])

    def row_crcs(self, rows) -> list[int]:
        """CRC-32 of each row in ``rows``: over its row of every dataset, in schema order
        (what write_shard records as ``row_crc32``)."""
        bufs = {c.name: np.empty(c.shape, dtype=c.dtype) for c in self.chunked}
        out = []
        for j in rows:
            j = int(j)
            crc = 0
            for c in self.cols:
                if c.chunked:
                    self.read(c.name, j, bufs[c.name])
                    crc = zlib.crc32(_row_bytes(bufs[c.name]), crc)
                else:
                    crc = zlib.crc32(_row_bytes(self.scalars[c.name][j : j + 1]), crc)
            out.append(crc)
        return out

    def bad_rows(self, rows, expected: list[int]) -> list[int]:
        """The rows among ``rows`` whose CRC-32 is not ``expected[row]``."""
        rows = [int(j) for j in rows]
        return [j for j, crc in zip(rows, self.row_crcs(rows)) if crc != expected[j]]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
