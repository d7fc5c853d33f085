"""The sbatch scripts in slurm/ on the real local SLURM cluster."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.fixtures import slurm_cluster  # noqa: F401
from tests.conftest import CONFIGS, REPO
from tests.test_generate import read_all
from trd_hpc.data.generate import generate
from trd_hpc.data.validate import validate_cohort_dir

pytestmark = pytest.mark.slurm
VENV_BIN = Path(sys.executable).parent


def job_env(**extra: str) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "TRD_HPC": str(VENV_BIN / "trd-hpc"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def wait_all(cluster, job: int, timeout: float) -> None:
    """Wait until no task of ``job`` (an array) is pending or running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(str(j).split("_")[0] == str(job) for j in cluster.active_jobs()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job} still active after {timeout} s")


def test_generate_array_makes_the_same_cohort_as_one_process(slurm_cluster, tmp_path, emt_tiny):
    out = tmp_path / "cohort"
    logs = tmp_path / "logs"
    logs.mkdir()
    job = slurm_cluster.sbatch(
        [
            "--array=0-3",
            f"--output={logs}/gen-%A_%a.out",
            "slurm/generate.sh",
            str(CONFIGS / "emt_tiny.yaml"),
            str(out),
        ],
        cwd=REPO,
        env=job_env(),
    )
    wait_all(slurm_cluster, job, timeout=300)
    log_text = "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert (out / "manifest.json").exists(), log_text
    assert validate_cohort_dir(out, progress=False) == []
    ref = tmp_path / "ref"
    generate(emt_tiny.cohort, ref, num_shards=1, progress=False)
    a, b = read_all(out), read_all(ref)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert len(list(out.glob("shard-*.h5"))) == 4


def test_ingest_array_makes_the_same_cohort_as_one_process(slurm_cluster, tmp_path):
    """slurm/ingest.sh: one array task per shard of a real cohort (nibabel's and bed-reader's
    example files); the result equals a one-process ingest, array by array."""
    from trd_hpc.data.generate import generate as write
    from trd_hpc.ingest.resolve import resolve
    from trd_hpc.tasks.emt.example import emt_folder

    spec = emt_folder(tmp_path / "src", n=12, spec_extra={"split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    out = tmp_path / "cohort"
    logs = tmp_path / "logs"
    logs.mkdir()
    job = slurm_cluster.sbatch(
        ["--array=0-2", f"--output={logs}/ingest-%A_%a.out", "slurm/ingest.sh", str(spec), str(out)],
        cwd=REPO,
        env=job_env(),
    )
    wait_all(slurm_cluster, job, timeout=300)
    log_text = "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert (out / "manifest.json").exists(), log_text
    assert validate_cohort_dir(out, progress=False) == []
    assert len(list(out.glob("shard-*.h5"))) == 3
    ref = tmp_path / "ref"
    write(resolve(spec), ref, num_shards=1, progress=False)
    a, b = read_all(out), read_all(ref)
    assert set(a) == set(b) and "participant_id" in a
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k  # a missing clinical value is NaN
    # the training script as it is, two DDP ranks, on the ingested cohort (with its evaluation)
    run, log = tmp_path / "run", tmp_path / "train.out"
    job = slurm_cluster.sbatch(
        [
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--output={log}",
            "slurm/train_emt.sh",
            "configs/emt_tiny.yaml",
            "--out",
            str(run),
            "train.max_epochs=1",
            "eval.baselines=[late_fusion_mlp]",
            f"data.cohort={out}",
            "tracking.wandb=false",
        ],
        cwd=REPO,
        env=job_env(),
        wait=True,
        timeout=600,
    )
    text = log.read_text() if log.exists() else ""
    assert slurm_cluster.job_state(job) == "COMPLETED", text[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert (m["world_size"], m["strategy"]) == (2, "ddp") and "baselines.late_fusion_mlp.auc" in m, text[-3000:]
