"""``trd-hpc bench load``: Dataset + DataLoader throughput against the raw disk read.

In one run, on the same cohort:
* raw: a plain sequential read of the shard files (cold page cache where this
  machine lets us drop it, and warm);
* ours: CohortDataset + ShardAwareSampler read in-process (num_workers 0), by 1 and 2 reading
  threads (worker_type thread, the default) and by 1 and 2 DataLoader worker processes;
* common: float32 storage and a Dataset that opens the HDF5 file on every item
  with h5py slicing and the default collate (what most projects do);
* memory: peak RSS (main process + workers) over an epoch of a cohort and of
  one 10x larger;
* verification: the first epoch of a fresh dataset, which checks every row
  against its checksum when it first opens a shard, against the same epoch
  with the check off (warm page cache, num_workers=0).
* virtual (``--virtual``): the same subjects regenerated in the loader from (seed, i),
  at num_workers 0, 1, 2 (worker processes: regenerating is CPU work, which threads taking
  turns at the reader would not spread), as a ratio to the sharded cohort cold and warm.
Targets: ours >= 0.8 of raw (in-process warm >= 0.9), >= 1.5x the common approach, reading
threads never slower than in-process, RSS flat.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trd_hpc.config import ConfigError, derive, load_config
from trd_hpc.data.dataset import CohortDataset, forget_verified, make_loader
from trd_hpc.data.generate import generate
from trd_hpc.data.manifest import load_manifest
from trd_hpc.data.sampler import ShardAwareSampler
from trd_hpc.fsio import atomic_write_json


def drop_caches(files: list[Path]) -> bool:
    """Evict the files from the page cache; True when it worked."""
    ok = True
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass
    return ok


def raw_read(files: list[Path], block: int = 16 << 20) -> tuple[float, int]:
    buf = bytearray(block)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


class PeakRSS:
    """Samples the RSS of this process and its children every 20 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
                for c in self.proc.children(recursive=True):
                    try:
                        rss += c.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


WARM_REPEATS = 3  # warm figures: the fastest of this many epochs (or raw reads)
# (figure key, num_workers, worker_type): in-process, reading threads, worker processes
MODES = [("w0", 0, "thread"), ("w1", 1, "thread"), ("w2", 2, "thread"), ("p1", 1, "process"), ("p2", 2, "process")]


def epoch(
    root: Path,
    workers: int,
    batch: int,
    bulk_name: str,
    cold_files: list[Path] | None = None,
    worker_type: str = "thread",
) -> tuple[float, int, int]:
    """Seconds, subjects and bulk bytes of the fastest of ``WARM_REPEATS`` epochs after a first
    one (steady state: worker start-up and first-touch allocations excluded, as for the raw
    read's buffer; the fastest, since a busy moment only ever slows an epoch down). With
    ``cold_files`` one epoch is timed, after the page cache is dropped."""
    ds = CohortDataset(root, "all")
    sampler = ShardAwareSampler.for_dataset(ds, shuffle=True, seed=0, block=16)
    loader = make_loader(
        ds,
        batch,
        sampler,
        num_workers=workers,
        prefetch_factor=2,
        persistent_workers=workers > 0,
        worker_type=worker_type,
    )
    best = float("inf")
    for e in range(2 if cold_files else 1 + WARM_REPEATS):
        sampler.set_epoch(e)
        if e == 1 and cold_files:
            drop_caches(cold_files)
        n = nbytes = 0
        t0 = time.perf_counter()
        for b in loader:
            n += len(b["subject_id"])
            nbytes += b[bulk_name].numel() * b[bulk_name].element_size()
            del b
        if e >= 1:
            best = min(best, time.perf_counter() - t0)
    dt = best
    del loader
    ds.close()
    return dt, n, nbytes


def first_epoch(root: Path, batch: int, verify: bool) -> float:
    """Seconds of the first epoch of a fresh in-process dataset (shards opened, and
    with ``verify`` checked, during it)."""
    forget_verified()
    ds = CohortDataset(root, "all", verify=verify)
    sampler = ShardAwareSampler.for_dataset(ds, shuffle=True, seed=0, block=16)
    t0 = time.perf_counter()
    for b in make_loader(ds, batch, sampler, num_workers=0):
        del b
    dt = time.perf_counter() - t0
    ds.close()
    return dt


class CommonDataset(Dataset):
    """The usual pattern: open the file for every item, slice with h5py."""

    def __init__(self, root: Path):
        m = load_manifest(root)
        self.items = [(root / s["file"], j) for s in m.shards for j in range(s["n_subjects"])]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, j = self.items[i]
        with h5py.File(path, "r") as f:
            return {
                "fmri": torch.from_numpy(f["fmri"][j]),
                "snp": torch.from_numpy(f["snp"][j]),
                "clinical": torch.from_numpy(f["clinical"][j]),
                "label": int(f["label"][j]),
            }


def common_epoch(root: Path, workers: int, batch: int) -> tuple[float, int]:
    loader = DataLoader(
        CommonDataset(root), batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True
    )
    for _ in range(2):  # second epoch timed, as for ours
        n = 0
        t0 = time.perf_counter()
        for b in loader:
            n += len(b["label"])
        dt = time.perf_counter() - t0
    return dt, n


def _make_cohorts(cfg, n: int, scratch: Path):
    """The float16 cohort (ours) and its float32 twin (common): ``(base, ours_dir, common_dir)``."""
    base = derive(cfg.cohort, {"n_subjects": n, "subjects_per_shard": max(n // 4, 1)}, "bench load")
    ours_dir, common_dir = scratch / "f16", scratch / "f32"
    print(f"making cohorts of {n} subjects in {scratch} ...", flush=True)
    generate(base, ours_dir, workers=2, progress=False)
    f32 = derive(base, {"fmri.dtype": "float32"}, "bench load")
    generate(f32, common_dir, workers=2, progress=False)
    return base, ours_dir, common_dir


def _measure_raw(figures: dict, files: list[Path], fmri_bytes_per_subject: int, n: int) -> float:
    """Raw sequential reads, cold and warm, into ``figures``; returns the fMRI share of the file bytes."""
    cold_ok = drop_caches(files)
    dt, nbytes = raw_read(files)
    figures["raw_cold_MB_per_s"] = nbytes / dt / 1e6
    figures["cold_cache_dropped"] = cold_ok
    dt, nbytes = min(raw_read(files) for _ in range(WARM_REPEATS))
    figures["raw_warm_MB_per_s"] = nbytes / dt / 1e6
    total_fraction = fmri_bytes_per_subject * n / nbytes  # fMRI share of the file bytes
    figures["raw_warm_subjects_per_s"] = figures["raw_warm_MB_per_s"] * 1e6 * total_fraction / fmri_bytes_per_subject
    return total_fraction


def _measure_modes(figures: dict, ours_dir: Path, files: list[Path], batch: int) -> None:
    for key, w, kind in MODES:
        for cache in ("cold", "warm"):
            dt, got, nb = epoch(ours_dir, w, batch, "fmri", files if cache == "cold" else None, kind)
            figures[f"ours_{key}_{cache}_subjects_per_s"] = got / dt
            figures[f"ours_{key}_{cache}_MB_per_s"] = nb / dt / 1e6


def _measure_virtual(figures: dict, base, scratch: Path, batch: int) -> None:
    """The same subjects regenerated in the loader: no page cache to be cold or warm."""
    from trd_hpc.data.generate import write_virtual

    write_virtual(base, scratch / "virtual")
    for w in (0, 1, 2):
        dt, got, _ = epoch(scratch / "virtual", w, batch, "fmri", worker_type="process")
        figures[f"virtual_w{w}_subjects_per_s"] = got / dt
        sharded = f"w{w}" if w == 0 else f"p{w}"  # the same worker processes
        for cache in ("cold", "warm"):
            figures[f"virtual_vs_sharded_w{w}_{cache}"] = (
                figures[f"virtual_w{w}_subjects_per_s"] / figures[f"ours_{sharded}_{cache}_subjects_per_s"]
            )


def _ratios(figures: dict, total_fraction: float) -> None:
    best_warm = max(figures[f"ours_{k}_warm_MB_per_s"] for k, _, _ in MODES)
    best_cold = max(figures[f"ours_{k}_cold_MB_per_s"] for k, _, _ in MODES)
    # Raw moves every byte of the file; ours counts only the fMRI bytes (>99 %).
    figures["ratio_to_raw_warm"] = best_warm / (figures["raw_warm_MB_per_s"] * total_fraction)
    figures["ratio_to_raw_cold"] = best_cold / (figures["raw_cold_MB_per_s"] * total_fraction)
    raw_warm = figures["raw_warm_MB_per_s"] * total_fraction
    figures["in_process_warm_to_raw"] = figures["ours_w0_warm_MB_per_s"] / raw_warm
    for cache in ("cold", "warm"):  # the slower of 1 and 2 reading threads, against in-process
        figures[f"threads_vs_in_process_{cache}"] = (
            min(figures[f"ours_w{w}_{cache}_MB_per_s"] for w in (1, 2)) / figures[f"ours_w0_{cache}_MB_per_s"]
        )


def _measure_verification(figures: dict, files: list[Path], ours_dir: Path, batch: int) -> None:
    raw_read(files)  # warm: the check's own cost, not the disk's
    plain = min(first_epoch(ours_dir, batch, verify=False) for _ in range(2))
    checked = min(first_epoch(ours_dir, batch, verify=True) for _ in range(2))
    figures["first_epoch_s_unchecked"] = plain
    figures["first_epoch_s_checked"] = checked
    figures["first_epoch_check_ratio"] = checked / plain


def _measure_common(figures: dict, common_dir: Path, batch: int) -> None:
    # Warm page cache for the float32 files too, so the comparison is of the code paths.
    raw_read(sorted(common_dir.glob("shard-*.h5")))
    dt, got = common_epoch(common_dir, 2, batch)
    figures["common_w2_warm_subjects_per_s"] = got / dt
    figures["speedup_vs_common"] = figures["ours_w2_warm_subjects_per_s"] / figures["common_w2_warm_subjects_per_s"]
    shutil.rmtree(common_dir, ignore_errors=True)


def _measure_memory(figures: dict, base, n: int, scratch: Path, ours_dir: Path, batch: int) -> None:
    big = derive(base, {"n_subjects": 10 * n}, "bench load")
    big_dir = scratch / "f16x10"
    print(f"making a cohort of {10 * n} subjects for the memory check ...", flush=True)
    generate(big, big_dir, workers=2, progress=False)
    for name, root in (("1x", ours_dir), ("10x", big_dir)):
        with PeakRSS() as rss:
            epoch(root, 2, batch, "fmri")
        figures[f"peak_rss_MB_{name}"] = rss.peak / 1e6
    figures["rss_growth_10x"] = figures["peak_rss_MB_10x"] / figures["peak_rss_MB_1x"]


def _print_report(f: dict, cfg, batch: int, n: int, virtual: bool) -> None:
    print(f"load: EMT fMRI {tuple(cfg.cohort.fmri.shape)} float16, batch {batch}, {n} subjects (10x: {10 * n})")
    print(
        f"  raw sequential read : cold {f['raw_cold_MB_per_s']:7.0f} MB/s   warm {f['raw_warm_MB_per_s']:7.0f} MB/s"
        + ("" if f["cold_cache_dropped"] else "  (could not drop the page cache)")
    )
    for key, w, kind in MODES:
        label = f"{w} {kind}{'es' if kind == 'process' else 's'}" if w > 1 else f"{w} {kind}" if w else "in-process"
        print(
            f"  ours {label:<11}: cold {f[f'ours_{key}_cold_MB_per_s']:7.0f} MB/s "
            f"({f[f'ours_{key}_cold_subjects_per_s']:6.1f} subj/s)   warm {f[f'ours_{key}_warm_MB_per_s']:7.0f} MB/s "
            f"({f[f'ours_{key}_warm_subjects_per_s']:6.1f} subj/s)"
        )
    if virtual:
        for w in (0, 1, 2):
            print(
                f"  virtual num_workers={w}: {f[f'virtual_w{w}_subjects_per_s']:6.1f} subj/s = "
                f"{f[f'virtual_vs_sharded_w{w}_cold']:.2f}x sharded cold, "
                f"{f[f'virtual_vs_sharded_w{w}_warm']:.2f}x sharded warm"
            )
    print(
        f"  in-process warm / raw warm: {f['in_process_warm_to_raw']:.2f} (target >= 0.9); reading threads / "
        f"in-process: warm {f['threads_vs_in_process_warm']:.2f}, cold {f['threads_vs_in_process_cold']:.2f} "
        f"(target >= 1: never slower)"
    )
    print(f"  common (f32, open per item, workers=2, warm): {f['common_w2_warm_subjects_per_s']:.1f} subj/s")
    print(
        f"  ratio to raw: warm {f['ratio_to_raw_warm']:.2f}, cold {f['ratio_to_raw_cold']:.2f} (target >= 0.8); "
        f"speed-up vs common: {f['speedup_vs_common']:.1f}x (target >= 1.5)"
    )
    print(
        f"  peak RSS over an epoch: {f['peak_rss_MB_1x']:.0f} MB (1x), {f['peak_rss_MB_10x']:.0f} MB (10x): "
        f"growth {f['rss_growth_10x']:.2f}x"
    )
    print(
        f"  checksums on first open: first epoch {f['first_epoch_s_checked']:.3f} s checked vs "
        f"{f['first_epoch_s_unchecked']:.3f} s unchecked = {f['first_epoch_check_ratio']:.2f}x (later epochs: no cost)"
    )


def measure(
    config: str | None = None,
    overrides=(),
    subjects: int | None = None,
    scratch_dir: str | None = None,
    json_path: str | None = None,
    virtual: bool = False,
) -> int:
    cfg = load_config(config or "emt", list(overrides))
    if cfg.cohort.kind != "emt":
        raise ConfigError(f"{config}: bench load compares against float32 fMRI storage: use an EMT config (task: emt)")
    n = subjects or 48
    batch = 12
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-load-"))
    scratch.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    figures: dict = {"benchmark": "load", "subjects": n, "batch": batch}
    try:
        base, ours_dir, common_dir = _make_cohorts(cfg, n, scratch)
        files = sorted(ours_dir.glob("shard-*.h5"))
        fmri_bytes_per_subject = int(np.prod(base.fmri.shape)) * 2
        total_fraction = _measure_raw(figures, files, fmri_bytes_per_subject, n)
        _measure_modes(figures, ours_dir, files, batch)
        if virtual:
            _measure_virtual(figures, base, scratch, batch)
        _ratios(figures, total_fraction)
        _measure_verification(figures, files, ours_dir, batch)
        _measure_common(figures, common_dir, batch)
        _measure_memory(figures, base, n, scratch, ours_dir, batch)
    finally:
        if not scratch_dir:
            shutil.rmtree(scratch, ignore_errors=True)

    _print_report(figures, cfg, batch, n, virtual)
    if json_path:
        atomic_write_json(json_path, figures)
    return 0
