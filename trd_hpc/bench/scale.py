"""``trd-hpc bench scale``: a cohort far beyond the papers' size, written and trained on.

In one run (defaults: the dual-path 3-D CNN's config, 100,000 volumes of 64x64x16 float32,
about 26 GB):
* generate: the big cohort with ``--workers`` processes, in subjects/s, against one worker
  writing a cohort of ``subjects / 50`` volumes (the per-subject cost does not depend on the
  cohort's size; a second full-size write would only double the run);
* train: ``--steps`` optimiser steps of the config's model on the big cohort, the sampler drawing
  across all of it, against the same steps on the paper-size cohort (1500 volumes, cycling
  epochs), each in a fresh process: samples/s and peak RSS (``ru_maxrss``). The cost per
  subject must stay flat: both ratios near 1.
The cohorts are deleted afterwards (unless ``--dir`` is given and ``--keep``).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trd_hpc.config import derive, load_config
from trd_hpc.data.generate import generate, subject_nbytes
from trd_hpc.fsio import atomic_write_json


class _Enough(Exception):
    """Raised from the step callback once the steps are done."""


def train_steps(config: str, overrides: list[str], root: str, steps: int) -> dict:
    """``steps`` optimiser steps on the cohort ``root`` in this process; samples/s, peak RSS."""
    import torch

    from trd_hpc.tasks import make_task
    from trd_hpc.train import distributed as D
    from trd_hpc.train.trainer import Trainer

    cfg = load_config(config, [*overrides, f"data.cohort={root}", "train.strategy=single"])
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    run_dir = Path(tempfile.mkdtemp(prefix="trd-bench-scale-run-"))
    try:
        t_setup = time.perf_counter()
        trainer = Trainer(cfg, make_task(cfg, root), run_dir / "run", D.DistInfo(), root, progress=False)
        t_setup = time.perf_counter() - t_setup
        done = {"steps": 0, "samples": 0}
        t0 = None
        io0 = 0

        def on_step(tr) -> None:
            nonlocal t0, io0
            done["steps"] += 1
            if done["steps"] == 1:  # from the end of the first step: start-up and first reads excluded
                t0, io0 = time.perf_counter(), _storage_read_bytes()
            else:
                done["samples"] += cfg.train.batch_size
            if done["steps"] >= steps:
                raise _Enough

        epoch = 0
        try:
            while True:
                trainer.train_epoch(epoch, on_step=on_step)
                epoch += 1
        except _Enough:
            pass
        dt = time.perf_counter() - t0
        io = _storage_read_bytes() - io0
        return {
            "steps": done["steps"],
            "epochs_started": epoch + 1,
            "train_subjects": len(trainer.datasets["train"]),
            "setup_seconds": t_setup,
            "samples_per_s": done["samples"] / dt,
            # bytes this process made the storage layer fetch (page-cache misses) per sample
            "storage_read_mb_per_sample": io / max(done["samples"], 1) / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _storage_read_bytes() -> int:
    """Bytes this process has caused to be fetched from storage (Linux /proc/self/io
    ``read_bytes``: page-cache misses, not reads served from memory); 0 where unknown."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _train_in_fresh_process(config: str, overrides: list[str], root: Path, steps: int) -> dict:
    code = (
        "import json, sys; from trd_hpc.bench.scale import train_steps; "
        "print(json.dumps(train_steps(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, config, json.dumps(list(overrides)), str(root), str(steps)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"training on {root} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(
    config: str | None = None,
    overrides=(),
    subjects: int | None = None,
    scratch_dir: str | None = None,
    json_path: str | None = None,
    steps: int = 2000,
    workers: int = 2,
    keep: bool = False,
) -> int:
    config = config or "cnn3d"
    cfg = load_config(config, list(overrides))
    n = subjects or 100_000
    paper_n = cfg.cohort.n_subjects
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    big, small, one = scratch / f"cohort-{n}", scratch / f"cohort-{paper_n}", scratch / "one-worker"
    per_subject = subject_nbytes(cfg.cohort)
    f: dict = {"benchmark": "scale", "config": config, "subjects": n, "paper_subjects": paper_n, "steps": steps}
    try:
        free = shutil.disk_usage(scratch).free
        need = per_subject * (n + paper_n + n // 50)
        print(
            f"bench scale: {n} subjects ({need / 1e9:.1f} GB with the comparison cohorts; {free / 1e9:.0f} GB free "
            f"in {scratch})",
            flush=True,
        )
        t0 = time.perf_counter()
        generate(derive(cfg.cohort, {"n_subjects": n}, "bench scale"), big, workers=workers, progress=True)
        f["generate_seconds"] = time.perf_counter() - t0
        f["generate_subjects_per_s"] = n / f["generate_seconds"]
        f["cohort_gb"] = sum(p.stat().st_size for p in big.glob("shard-*.h5")) / 1e9
        m = max(n // 50, 2 * cfg.cohort.subjects_per_shard)
        t0 = time.perf_counter()
        generate(derive(cfg.cohort, {"n_subjects": m}, "bench scale"), one, workers=1, progress=False)
        f["one_worker_subjects"] = m
        f["one_worker_subjects_per_s"] = m / (time.perf_counter() - t0)
        f["workers"] = workers
        f["generate_ratio_to_one_worker"] = f["generate_subjects_per_s"] / f["one_worker_subjects_per_s"]
        shutil.rmtree(one, ignore_errors=True)
        generate(cfg.cohort, small, workers=workers, progress=False)

        for name, root in (("big", big), ("paper", small)):
            print(f"bench scale: {steps} steps on {root.name} ...", flush=True)
            f[f"train_{name}"] = _train_in_fresh_process(config, list(overrides), root, steps)
        b, p = f["train_big"], f["train_paper"]
        f["samples_per_s_ratio"] = b["samples_per_s"] / p["samples_per_s"]
        f["peak_rss_ratio"] = b["peak_rss_mb"] / p["peak_rss_mb"]
    finally:
        if not (scratch_dir and keep):
            shutil.rmtree(big, ignore_errors=True)
            shutil.rmtree(small, ignore_errors=True)
            shutil.rmtree(one, ignore_errors=True)
            if not scratch_dir:
                shutil.rmtree(scratch, ignore_errors=True)
    print(f"scale: {cfg.task} cohort of {n} subjects ({f['cohort_gb']:.1f} GB)")
    print(
        f"  generate with {workers} workers: {f['generate_subjects_per_s']:.1f} subjects/s "
        f"({f['generate_seconds']:.0f} s) = {f['generate_ratio_to_one_worker']:.2f}x one worker "
        f"({f['one_worker_subjects_per_s']:.1f} subjects/s on {f['one_worker_subjects']})"
    )
    print(
        f"  train {steps} steps: {b['samples_per_s']:.1f} samples/s on {b['train_subjects']} training subjects vs "
        f"{p['samples_per_s']:.1f} on {p['train_subjects']} = {f['samples_per_s_ratio']:.2f}x; "
        f"peak RSS {b['peak_rss_mb']:.0f} vs {p['peak_rss_mb']:.0f} MB = {f['peak_rss_ratio']:.2f}x (target: both ~1)"
    )
    print(
        f"  from storage (page-cache misses) during the steps: {b['storage_read_mb_per_sample']:.3f} vs "
        f"{p['storage_read_mb_per_sample']:.3f} MB a sample; start-up (trainer, content checks of every split): "
        f"{b['setup_seconds']:.1f} vs {p['setup_seconds']:.1f} s"
    )
    if json_path:
        atomic_write_json(json_path, f)
    return 0
