"""Smoke tests of the real local SLURM cluster (tests/cluster)."""

from __future__ import annotations

import time

import pytest

# Also imported by tests/conftest.py; the fixture is reference-counted, so both
# share one cluster.
from tests.cluster.fixtures import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm


def test_sbatch_wait_writes_file_and_completes(slurm_cluster, tmp_path):  # noqa: F811
    job_id = slurm_cluster.sbatch(
        [
            "--wait",
            "--job-name=smoke",
            "--output=smoke-%j.out",
            "--wrap",
            'echo "hello from $SLURM_JOB_ID" > result.txt',
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert (tmp_path / "result.txt").read_text() == f"hello from {job_id}\n"
    assert slurm_cluster.wait_job(job_id, timeout=30) == "COMPLETED"
    # the accounting database (what sacct and submitit read) agrees, soon
    deadline = time.monotonic() + 30
    while slurm_cluster.sacct_state(job_id) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.sacct_state(job_id) == "COMPLETED"


def test_two_task_job_runs_both_ranks(slurm_cluster, tmp_path):  # noqa: F811
    job_id = slurm_cluster.sbatch(
        [
            "--wait",
            "--ntasks=2",
            "--output=ranks.out",
            "--wrap",
            "srun bash -c 'echo rank=$SLURM_PROCID of $SLURM_NTASKS'",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    out = (tmp_path / "ranks.out").read_text()
    assert "rank=0 of 2" in out and "rank=1 of 2" in out, out
    assert slurm_cluster.wait_job(job_id, timeout=30) == "COMPLETED"
