"""Writing a cohort: shards in parallel processes (or one SLURM array task each),
then the manifest.

Re-running is safe and cheap to reason about: a shard whose file and sidecar
record exist and whose content checksum verifies is kept; a missing, partial
or corrupt one is made again.  The manifest is written once every shard is
present, by whichever process completes the last one (or by ``--finalize``).

Nothing that is not this cohort is ever replaced: before anything is written,
the target directory must be missing, empty, or hold this very cohort (its
cohort.json and manifest.json, where present, record this config, and every
readable shard's own attributes say it was made with it).  Anything else -
another cohort, another tool's manifest.json or shard files, unrelated files -
is refused untouched unless ``force``.

One writer at a time: a full generate and ``--finalize`` hold the directory's
lock exclusively; SLURM array tasks (``shard_index``) hold it shared, so they
run side by side, plus an exclusive lock on their own shard (and the one that
writes the manifest, a lock on that).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trd_hpc.config import CohortConfig, ConfigError, to_dict
from trd_hpc.data import manifest as mf
from trd_hpc.data.kinds import kind_of
from trd_hpc.data.shards import (
    SCHEMA_VERSION,
    CohortError,
    config_diffs,
    config_fingerprint,
    encode_labels,
    schema,
    shard_name,
    sidecar_name,
    write_shard,
)
from trd_hpc.data.target_dir import (  # noqa: F401  (check_target_dir: re-exported)
    LAYOUT,
    MANIFEST_LOCK,
    check_target_dir,
    default_num_shards,
    prepare_dir,
    shard_problem,
)
from trd_hpc.errors import IngestError, LockedError, WriteError
from trd_hpc.fsio import HOST, pid_alive, remove_stale_temps
from trd_hpc.locks import DirLock


def plan_shards(n_subjects: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous subject ranges [first, stop), sizes differing by at most one."""
    if not 1 <= num_shards <= n_subjects:
        raise ConfigError(f"--num-shards must be between 1 and the number of subjects ({n_subjects}), got {num_shards}")
    bounds = [n_subjects * k // num_shards for k in range(num_shards + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(num_shards)]


def subject_nbytes(cfg: CohortConfig) -> int:
    return sum(int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize for c in schema(cfg))


# ---------------------------------------------------------------- splits
def make_splits(cfg: CohortConfig, labels: np.ndarray) -> tuple[dict[str, list[int]], list[list[int]]]:
    """The manifest's splits and folds for these labels (scikit-learn, seeded)."""
    return kind_of(cfg).make_splits(cfg, labels)


def predicted_labels(cfg: CohortConfig) -> np.ndarray:
    """Every subject's class, without generating the subjects."""
    return kind_of(cfg).predicted_labels(cfg)


def _split_failed(cfg: CohortConfig, e: Exception) -> ConfigError:
    fractions = ", ".join(f"{k}={v}" for k, v in cfg.split.model_dump().items())
    return ConfigError(
        f"cohort.n_subjects={cfg.n_subjects} with cohort.split ({fractions}) cannot be split into stratified "
        f"parts: {e}; use more subjects or other fractions"
    )


def check_splittable(cfg: CohortConfig) -> None:
    """ConfigError unless finalize will be able to split this cohort: the same
    splits, on the same labels, tried before any shard is written (shards
    without a manifest are what a failure at the end would leave)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a fold with few of a class splits, and warns
            make_splits(cfg, predicted_labels(cfg))
    except IngestError:
        raise  # says itself why the subjects do not split
    except ValueError as e:
        raise _split_failed(cfg, e) from None


# ---------------------------------------------------------------- locks
def _live_shard_writers(out: Path) -> list[str]:
    """Holders of per-shard locks that are alive (array tasks), for a refusal message."""
    found = []
    for p in sorted(out.glob(".shard-*.lock")):
        try:
            h = json.loads(p.read_text() or "{}")
            if h.get("host") == HOST and not pid_alive(int(h["pid"])):
                continue
            found.append(f"pid {h['pid']} on {h['host']} ({p.name[1:-5]})")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _lock(out: Path, shared: bool = False) -> DirLock:
    lock = DirLock(out, what="cohort directory", shared=shared)
    try:
        return lock.acquire()
    except LockedError as e:
        writers = _live_shard_writers(out) if not shared else []
        if writers:
            raise LockedError(
                f"{out}: this cohort directory is in use by array tasks writing shards: {', '.join(writers)}; "
                f"wait for them to finish or use another directory"
            ) from None
        raise e from None


# ---------------------------------------------------------------- worker side
_progress_q = None


def _init_worker(q) -> None:
    global _progress_q
    _progress_q = q
    import torch
    from threadpoolctl import threadpool_limits

    # One thread per worker for every pool in the process: torch's, and numpy's OpenBLAS and
    # OpenMP (scikit-learn brings threadpoolctl). With each library's default of one thread per
    # core, two volume workers ran at 0.71x one worker on 2 cores (oversubscribed, spinning).
    torch.set_num_threads(1)
    threadpool_limits(1)


def _shard_task(
    cfg_dict: dict, out: str, k: int, first: int, stop: int, verify: bool, force: bool = False
) -> tuple[int, str]:
    from trd_hpc.config import validate_cohort

    cfg = validate_cohort(cfg_dict)
    outp = Path(out)
    problem = shard_problem(cfg, outp, k, first, stop, verify, force)
    if problem is None:
        if _progress_q is not None:
            _progress_q.put(("kept", stop - first))
        return k, "kept"
    # The old record stays until write_shard replaces it: a write that fails (full disk)
    # leaves the directory as it was, and a record beside a broken file is re-checked anyway.
    report = (lambda nbytes: _progress_q.put(("subject", nbytes))) if _progress_q is not None else None
    write_shard(cfg, outp, k, first, stop, on_subject=report)
    return k, "made" if problem == "missing" else f"remade ({problem})"


# ---------------------------------------------------------------- driver side
@dataclass
class GenerateResult:
    out: Path
    made: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    remade: dict[int, str] = field(default_factory=dict)
    finalized: bool = False
    seconds: float = 0.0
    subjects_written: int = 0
    bytes_written: int = 0


def generate(
    cfg: CohortConfig,
    out: str | Path,
    num_shards: int | None = None,
    workers: int = 1,
    shard_index: int | None = None,
    finalize_only: bool = False,
    verify_existing: bool = True,
    progress: bool = True,
    force: bool = False,
) -> GenerateResult:
    """Write cohort ``cfg`` into ``out`` (see the module docstring).

    ``force``: write even though ``out`` holds files that are not this cohort's
    (another config's cohort.json, manifest.json or shards are replaced; other
    files are left alone).  Errors: ConfigError (arguments, a cohort too small
    to split), CohortError (``out`` is someone else's), LockedError (another
    generate writes there), WriteError (disk full, read-only)."""
    out = Path(out)
    num_shards = default_num_shards(cfg) if num_shards is None else num_shards
    plan = plan_shards(cfg.n_subjects, num_shards)
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    if not finalize_only:
        check_splittable(cfg)
    # Before any lock or directory exists: a refused directory gets not even a lock file.
    check_target_dir(cfg, out, num_shards, force)
    if not finalize_only:
        _check_space(cfg, out, plan, list(range(num_shards)) if shard_index is None else [shard_index])
    res = GenerateResult(out)
    t0 = time.perf_counter()
    if finalize_only or shard_index is None:
        lock = _lock(out)
        try:
            prepare_dir(cfg, out, num_shards, force)
            remove_stale_temps(out)
            if not finalize_only:
                _run_shards(cfg, out, plan, list(range(num_shards)), workers, verify_existing, progress, res, force)
            res.seconds = time.perf_counter() - t0
            missing = _missing(out, num_shards)
            if not missing:
                finalize(cfg, out, plan, force)
                res.finalized = True
            elif finalize_only:
                raise CohortError(
                    f"{out}: cannot finalize, shards missing: {', '.join(shard_name(k) for k in missing)}"
                )
        finally:
            lock.release()
        return res

    # One SLURM array task: the directory shared with the other tasks, its own shard exclusively.
    lock = _lock(out, shared=True)
    try:
        mine = DirLock(out, what=f"shard {shard_index} of this cohort", name=f".shard-{shard_index:05d}.lock").acquire()
        try:
            prepare_dir(cfg, out, num_shards, force)
            remove_stale_temps(out)
            _run_shards(cfg, out, plan, [shard_index], workers, verify_existing, progress, res, force)
        finally:
            mine.release()
        res.seconds = time.perf_counter() - t0
        # The task that sees every shard present writes the manifest, still under the shared
        # lock (no full generate can start meanwhile; the directory's exclusive lock would
        # turn away tasks starting now).  Of tasks finishing together one writes it: the
        # others find the manifest lock taken, and would have written the same.
        if not _missing(out, num_shards):
            try:
                writer = DirLock(out, what="manifest of this cohort", name=MANIFEST_LOCK).acquire()
            except LockedError:
                return res
            try:
                finalize(cfg, out, plan, force)
                res.finalized = True
            finally:
                writer.release()
    finally:
        lock.release()
    return res


def _missing(out: Path, num_shards: int) -> list[int]:
    return [k for k in range(num_shards) if not (out / sidecar_name(k)).exists() or not (out / shard_name(k)).exists()]


def _check_space(cfg: CohortConfig, out: Path, plan, todo: list[int]) -> None:
    """WriteError before writing when the shards still missing cannot fit."""
    need = sum(
        (plan[k][1] - plan[k][0]) * subject_nbytes(cfg) + (1 << 16) for k in todo if not (out / shard_name(k)).exists()
    )
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise WriteError(
            f"{out}: the shards still to be written need about {need / 1e9:.3g} GB, the file system has "
            f"{free / 1e9:.3g} GB free; nothing was written"
        )


def _run_shards(cfg, out, plan, todo, workers, verify, progress, res, force=False) -> None:
    from tqdm import tqdm

    per_subject = subject_nbytes(cfg)
    total = sum(plan[k][1] - plan[k][0] for k in todo)
    verb = "generate" if kind_of(cfg).generated else "ingest"
    bar = tqdm(total=total, unit="subj", desc=f"{verb} {out.name}", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()

    def on_event(kind: str, value: int) -> None:
        if kind == "kept":
            bar.total -= value
            bar.refresh()
            return
        res.subjects_written += 1
        res.bytes_written += per_subject
        bar.update(1)
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{res.bytes_written / dt / 1e6:.0f} MB/s", refresh=False)

    def record(k: int, status: str) -> None:
        if status == "kept":
            res.kept.append(k)
        elif status == "made":
            res.made.append(k)
        else:
            res.remade[k] = status

    cfg_dict = to_dict(cfg)
    try:
        if workers <= 1 or len(todo) == 1:
            global _progress_q
            import queue as _queue

            q: _queue.SimpleQueue = _queue.SimpleQueue()
            _progress_q = q
            try:
                for k in todo:
                    first, stop = plan[k]
                    # Events arrive from the writer thread; drain them after each shard
                    # and, for a live bar, from a small polling thread.
                    _drain_live(
                        q,
                        on_event,
                        lambda k=k, first=first, stop=stop: _shard_task(
                            cfg_dict, str(out), k, first, stop, verify, force
                        ),
                        record,
                    )
            finally:
                _progress_q = None
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)
            ) as ex:
                futs = {ex.submit(_shard_task, cfg_dict, str(out), k, *plan[k], verify, force) for k in todo}
                while futs:
                    _drain(q, on_event)
                    done, futs = wait(futs, timeout=0.2, return_when=FIRST_COMPLETED)
                    for f in done:
                        record(*f.result())
                _drain(q, on_event)
    finally:
        bar.close()


def _drain(q, on_event) -> None:
    import queue as _queue

    while True:
        try:
            kind, value = q.get_nowait()
        except (_queue.Empty, EOFError, OSError):
            return
        on_event(kind, value)


def _drain_live(q, on_event, task, record) -> None:
    import threading

    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            _drain(q, on_event)
            stop.wait(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        record(*task())
    finally:
        stop.set()
        t.join()
        _drain(q, on_event)


def finalize(cfg: CohortConfig, out: Path, plan: list[tuple[int, int]], force: bool = False) -> dict:
    """Write manifest.json from the shards' completion records (the caller holds the lock).

    An existing manifest of another cohort (or one that is not JSON) is not
    replaced unless ``force``; one identical to the new content is left as it is."""
    shards = []
    for k, (first, stop) in enumerate(plan):
        side = out / sidecar_name(k)
        rec, why = mf.read_json(side)
        if why or not isinstance(rec, dict):
            raise CohortError(
                f"{side}: completion record {why or 'is not an object'}; run generate again to remake shard {k}"
            )
        try:
            if rec["config_fingerprint"] != config_fingerprint(cfg) or rec["file"] != shard_name(k):
                raise CohortError(
                    f"{side}: completion record of another config or shard; run generate again to remake shard {k}"
                )
            if (rec["first_subject"], rec["n_subjects"]) != (first, stop - first):
                raise CohortError(f"{side}: subject range does not match the cohort layout")
            size = (out / shard_name(k)).stat().st_size
            if size != rec["bytes"]:  # a remake that failed left the old, broken file
                raise CohortError(
                    f"{out / shard_name(k)}: {size} bytes, its completion record says {rec['bytes']}; "
                    f"run generate again to remake it"
                )
            entry = {
                "file": rec["file"],
                "first_subject": first,
                "last_subject": stop - 1,
                "n_subjects": stop - first,
                "bytes": rec["bytes"],
                "checksum": rec["checksum"],
                "labels": rec["labels"],
            }
        except KeyError as e:
            raise CohortError(f"{side}: completion record lacks {e}; run generate again to remake shard {k}") from None
        if "row_crc32" in rec:
            entry["row_crc32"] = rec["row_crc32"]
        shards.append(entry)
    return write_cohort_manifest(cfg, out, shards, force)


def write_virtual(cfg: CohortConfig, out: str | Path, num_shards: int | None = None, force: bool = False) -> dict:
    """A virtual cohort: manifest.json and its splits, no shard.  Every subject's class is
    known from the config (``predicted_labels``), so the manifest is exactly the sharded
    cohort's but for ``virtual: true`` and the shards' sizes and checksums; the dataset
    regenerates subject *i* from (seed, *i*) when it is read (``data/virtual.py``)."""
    out = Path(out)
    num_shards = default_num_shards(cfg) if num_shards is None else num_shards
    plan = plan_shards(cfg.n_subjects, num_shards)
    if not kind_of(cfg).generated:
        raise ConfigError(f"cohort kind '{cfg.kind}' is read from files, not generated: it cannot be virtual")
    check_splittable(cfg)
    check_target_dir(cfg, out, num_shards, force)
    have, _ = mf.read_json(out / mf.MANIFEST) if (out / mf.MANIFEST).exists() else (None, None)
    if isinstance(have, dict) and not have.get("virtual") and not force:
        raise CohortError(
            f"{out}: holds this cohort's shards already; it is read from them (--force to make it virtual)"
        )
    labels = predicted_labels(cfg)
    shards = [
        {
            "file": shard_name(k),
            "first_subject": first,
            "last_subject": stop - 1,
            "n_subjects": stop - first,
            "bytes": 0,
            "checksum": "virtual",
            "labels": encode_labels(labels[first:stop]),
        }
        for k, (first, stop) in enumerate(plan)
    ]
    lock = _lock(out)
    try:
        prepare_dir(cfg, out, num_shards, force)
        return write_cohort_manifest(cfg, out, shards, force, virtual=True)
    finally:
        lock.release()


def write_cohort_manifest(cfg: CohortConfig, out: Path, shards: list[dict], force: bool, virtual: bool = False) -> dict:
    """manifest.json for these shard entries: splits, folds, class counts (the caller holds the lock)."""
    labels = mf.decode_labels("".join(s["labels"] for s in shards))
    names = mf.class_names(cfg)
    try:
        splits, folds = make_splits(cfg, labels)
    except IngestError:
        raise
    except ValueError as e:
        raise _split_failed(cfg, e) from None

    def counts(ids) -> dict[str, int]:
        picked = labels[np.asarray(ids, dtype=np.int64)]
        c = np.bincount(picked[picked >= 0], minlength=len(names))
        return {n: int(v) for n, v in zip(names, c)}

    import h5py
    import torch

    from trd_hpc import __version__

    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": cfg.kind,
        "generator": f"trd-hpc {__version__}",
        "versions": {
            "numpy": np.__version__,
            "torch": torch.__version__,
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
        },
        "config": to_dict(cfg),
        "n_subjects": int(len(labels)),
        "labelled": bool(getattr(cfg, "labelled", True)),
        "datasets": {c.name: {"shape": list(c.shape), "dtype": c.dtype, "chunked": c.chunked} for c in schema(cfg)},
        "class_names": names,
        "class_counts": counts(np.arange(len(labels))),
        "split_class_counts": {k: counts(v) for k, v in splits.items()},
        **({"virtual": True} if virtual else {}),
        "shards": shards,
        "splits": splits,
        "folds": folds,
        "splits_sha256": mf.splits_fingerprint(splits, folds),  # checked at every load
    }
    extras = kind_of(cfg).manifest_extras
    if extras is not None:
        data.update(extras(cfg))
    path = out / mf.MANIFEST
    if path.exists():
        have, why = mf.read_json(path)
        if not force:
            if why or not isinstance(have, dict):
                raise CohortError(f"{path}: {why or 'not a cohort manifest'}; not replaced (delete it, or --force)")
            diffs = config_diffs(have.get("config"), cfg)
            if diffs:
                raise CohortError(
                    f"{path}: records a cohort made differently ({'; '.join(diffs)}); not replaced (--force)"
                )
        if have == json.loads(json.dumps(data)):
            remove_stale_temps(out)
            return data
    mf.write_manifest(out, data)
    remove_stale_temps(out)
    return data
