"""``trd-hpc bench generate``: cohort writing against this machine's limit for the same work.

The limit is measured in the same run, in one process, like one generation
worker: draw the same number of float32 normals with the fastest generator
at hand (torch's CPU ``randn``) and write the same number of bytes to a plain
file.  Ours/limit >= 0.8 is the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trd_hpc.config import derive, load_config
from trd_hpc.data.generate import generate, subject_nbytes
from trd_hpc.fsio import atomic_write_json


def _limit(n_subjects: int, numel: int, nbytes: int, scratch: Path) -> float:
    """Seconds to draw ``numel`` normals and write ``nbytes`` per subject, sequentially."""
    g = torch.Generator().manual_seed(0)
    buf = np.empty(nbytes, dtype=np.uint8)
    path = scratch / "plain.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n_subjects):
            x = torch.randn(numel, generator=g, dtype=torch.float32)
            del x
            f.write(memoryview(buf))
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def measure(
    config: str | None = None,
    overrides=(),
    subjects: int | None = None,
    scratch_dir: str | None = None,
    json_path: str | None = None,
) -> int:
    cfg = load_config(config or "emt", list(overrides))
    n = subjects or 64
    cohort = derive(cfg.cohort, {"n_subjects": n, "subjects_per_shard": max(n // 2, 1)}, "bench generate")
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-gen-"))
    scratch.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    per_subject = subject_nbytes(cohort)
    bulk = cohort.fmri.shape if cohort.kind == "emt" else cohort.shape
    numel = int(np.prod(bulk))
    try:
        out = scratch / "cohort"
        shutil.rmtree(out, ignore_errors=True)
        # Sync inside generate (fsync per shard) is part of the timed work, as in the limit.
        t0 = time.perf_counter()
        generate(cohort, out, workers=1, progress=False)
        ours = time.perf_counter() - t0
        limit = _limit(n, numel, per_subject, scratch)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not scratch_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    figures = {
        "benchmark": "generate",
        "kind": cohort.kind,
        "subjects": n,
        "bytes_per_subject": per_subject,
        "ours_subjects_per_s": n / ours,
        "ours_MB_per_s": n * per_subject / ours / 1e6,
        "limit_subjects_per_s": n / limit,
        "limit_MB_per_s": n * per_subject / limit / 1e6,
        "ratio_to_limit": limit / ours,
        "target_ratio": 0.8,
    }
    print(
        f"generate {cohort.kind}: {n} subjects of {per_subject / 1e6:.2f} MB, one process\n"
        f"  ours : {figures['ours_subjects_per_s']:7.1f} subjects/s  {figures['ours_MB_per_s']:7.0f} MB/s "
        f"(incl. startup, manifest, splits)\n"
        f"  limit: {figures['limit_subjects_per_s']:7.1f} subjects/s  {figures['limit_MB_per_s']:7.0f} MB/s "
        f"(torch.randn of {numel} float32 + plain write of {per_subject} bytes)\n"
        f"  ratio: {figures['ratio_to_limit']:.2f} (target >= 0.8)"
    )
    if json_path:
        atomic_write_json(json_path, figures)
    return 0
