"""Writing a cohort: shards in parallel processes (or one SLURM array task each),
then the manifest.

Re-running is safe and cheap to reason about: a shard whose file and sidecar
record exist and whose content checksum verifies is kept; a missing, partial
or corrupt one is made again.  The manifest is written once every shard is
present, by whichever process completes the last one (or by ``--finalize``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, wait, FIRST_COMPLETED
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trd_hpc.config import CohortConfig, EMTCohortConfig, to_dict
from trd_hpc.data import manifest as mf
from trd_hpc.data.shards import (
    SCHEMA_VERSION,
    CohortError,
    _atomic_write_text,
    config_fingerprint,
    schema,
    shard_content_checksum,
    shard_name,
    sidecar_name,
    write_shard,
)
from trd_hpc.data.splits import stratified_folds, three_way_split, train_test_with_val

LAYOUT = "cohort.json"


def plan_shards(n_subjects: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous subject ranges [first, stop), sizes differing by at most one."""
    if not 1 <= num_shards <= n_subjects:
        raise ValueError(f"--num-shards must be between 1 and the number of subjects ({n_subjects}), got {num_shards}")
    bounds = [n_subjects * k // num_shards for k in range(num_shards + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(num_shards)]


def default_num_shards(cfg: CohortConfig) -> int:
    return max(1, -(-cfg.n_subjects // cfg.subjects_per_shard))


def subject_nbytes(cfg: CohortConfig) -> int:
    return sum(int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize for c in schema(cfg))


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} on disk, {b!r} asked)"]


def prepare_dir(cfg: CohortConfig, out: Path, num_shards: int) -> None:
    """Create ``out`` and pin its config and shard layout, or check they match."""
    out.mkdir(parents=True, exist_ok=True)
    want = {"schema_version": SCHEMA_VERSION, "config": to_dict(cfg), "num_shards": num_shards}
    path = out / LAYOUT
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CohortError(f"{path}: not valid JSON ({e}); delete it to start this cohort again") from None
        diffs = _diff_keys(have.get("config"), want["config"], "cohort.")
        if have.get("num_shards") != num_shards:
            diffs.append(f"--num-shards ({have.get('num_shards')} on disk, {num_shards} asked)")
        if have.get("schema_version") != SCHEMA_VERSION:
            diffs.append(f"schema_version ({have.get('schema_version')} on disk, {SCHEMA_VERSION} here)")
        if diffs:
            raise CohortError(
                f"{out} already holds a cohort made differently ({path}): "
                + "; ".join(diffs)
                + ". Use another --out, or delete the directory to remake it."
            )
        return
    _atomic_write_text(path, json.dumps(want, indent=1))


def shard_problem(cfg: CohortConfig, out: Path, k: int, first: int, stop: int, verify: bool = True) -> str | None:
    """Why shard ``k`` must be (re)made, or None when it is complete and verifies."""
    f = out / shard_name(k)
    side = out / sidecar_name(k)
    if not f.exists():
        return "missing"
    if not side.exists():
        return "no completion record (interrupted?)"
    try:
        rec = json.loads(side.read_text())
    except json.JSONDecodeError:
        return "completion record unreadable"
    if rec.get("config_fingerprint") != config_fingerprint(cfg) or (rec["first_subject"], rec["n_subjects"]) != (first, stop - first):
        return "made with another config or layout"
    if f.stat().st_size != rec["bytes"]:
        return f"size {f.stat().st_size} != recorded {rec['bytes']} (truncated?)"
    if verify:
        try:
            got = shard_content_checksum(f, cfg)
        except (CohortError, OSError, KeyError, ValueError) as e:
            return f"unreadable: {e}"
        if got != rec["checksum"]:
            return "checksum mismatch (corrupt)"
    return None


def _clean_tmp(out: Path, k: int | None = None) -> None:
    pattern = f".{shard_name(k)}.tmp-*" if k is not None else ".shard-*.h5.tmp-*"
    for p in out.glob(pattern):
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------- worker side
_progress_q = None


def _init_worker(q) -> None:
    global _progress_q
    _progress_q = q
    import torch

    torch.set_num_threads(1)


def _shard_task(cfg_dict: dict, out: str, k: int, first: int, stop: int, verify: bool) -> tuple[int, str]:
    from trd_hpc.config import validate_cohort

    cfg = validate_cohort(cfg_dict)
    outp = Path(out)
    problem = shard_problem(cfg, outp, k, first, stop, verify)
    if problem is None:
        if _progress_q is not None:
            _progress_q.put(("kept", stop - first))
        return k, "kept"
    _clean_tmp(outp, k)
    (outp / sidecar_name(k)).unlink(missing_ok=True)
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
) -> GenerateResult:
    out = Path(out)
    num_shards = num_shards or default_num_shards(cfg)
    plan = plan_shards(cfg.n_subjects, num_shards)
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    prepare_dir(cfg, out, num_shards)
    res = GenerateResult(out)
    t0 = time.perf_counter()
    if not finalize_only:
        todo = [shard_index] if shard_index is not None else list(range(num_shards))
        _run_shards(cfg, out, plan, todo, workers, verify_existing, progress, res)
    res.seconds = time.perf_counter() - t0
    missing = [k for k in range(num_shards) if not (out / sidecar_name(k)).exists() or not (out / shard_name(k)).exists()]
    if not missing:
        finalize(cfg, out, plan)
        res.finalized = True
    elif finalize_only:
        raise CohortError(f"{out}: cannot finalize, shards missing: {', '.join(shard_name(k) for k in missing)}")
    return res


def _run_shards(cfg, out, plan, todo, workers, verify, progress, res) -> None:
    from tqdm import tqdm

    per_subject = subject_nbytes(cfg)
    total = sum(plan[k][1] - plan[k][0] for k in todo)
    bar = tqdm(total=total, unit="subj", desc=f"generate {out.name}", disable=not progress, dynamic_ncols=True)
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
                    _drain_live(q, on_event, lambda: _shard_task(cfg_dict, str(out), k, first, stop, verify), record)
            finally:
                _progress_q = None
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as ex:
                futs = {ex.submit(_shard_task, cfg_dict, str(out), k, *plan[k], verify) for k in todo}
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


def finalize(cfg: CohortConfig, out: Path, plan: list[tuple[int, int]]) -> dict:
    """Write manifest.json from the shards' completion records."""
    shards = []
    for k, (first, stop) in enumerate(plan):
        rec = json.loads((out / sidecar_name(k)).read_text())
        if (rec["first_subject"], rec["n_subjects"]) != (first, stop - first):
            raise CohortError(f"{out / sidecar_name(k)}: subject range does not match the cohort layout")
        shards.append(
            {
                "file": rec["file"],
                "first_subject": first,
                "last_subject": stop - 1,
                "n_subjects": stop - first,
                "bytes": rec["bytes"],
                "checksum": rec["checksum"],
                "labels": rec["labels"],
            }
        )
    labels = np.frombuffer("".join(s["labels"] for s in shards).encode(), dtype=np.uint8) - ord("0")
    names = mf.class_names(cfg)
    folds: list[list[int]] = []
    if isinstance(cfg, EMTCohortConfig):
        s = cfg.split
        splits = three_way_split(labels, s.train, s.val, s.test, cfg.seed)
    else:
        splits = train_test_with_val(labels, cfg.split.test, cfg.split.val, cfg.seed)
        folds = stratified_folds(labels, cfg.split.folds, cfg.seed)

    def counts(ids) -> dict[str, int]:
        c = np.bincount(labels[np.asarray(ids, dtype=np.int64)], minlength=len(names))
        return {n: int(v) for n, v in zip(names, c)}

    import h5py
    import torch

    from trd_hpc import __version__

    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": cfg.kind,
        "generator": f"trd-hpc {__version__}",
        "versions": {"numpy": np.__version__, "torch": torch.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version},
        "config": to_dict(cfg),
        "n_subjects": int(len(labels)),
        "datasets": {c.name: {"shape": list(c.shape), "dtype": c.dtype, "chunked": c.chunked} for c in schema(cfg)},
        "class_names": names,
        "class_counts": counts(np.arange(len(labels))),
        "split_class_counts": {k: counts(v) for k, v in splits.items()},
        "shards": shards,
        "splits": splits,
        "folds": folds,
    }
    mf.write_manifest(out, data)
    _clean_tmp(out)
    return data
