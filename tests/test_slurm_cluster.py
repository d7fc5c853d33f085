"""Smoke tests of the real local SLURM cluster (tests/cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Also imported by tests/conftest.py; the fixture is reference-counted, so both
# share one cluster.
from tests.cluster.fixtures import slurm_cluster  # noqa: F401
from tests.conftest import REPO

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


def _net_names() -> set[str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {f"link:{ln.split(': ')[1].split('@')[0]}" for ln in links.splitlines() if ": " in ln} | {
        f"netns:{ln.split()[0]}" for ln in spaces.splitlines() if ln.strip()
    }


@pytest.mark.multinode
def test_two_node_cluster_removes_its_namespaces_even_when_its_owner_was_killed(tmp_path):
    """Stopping removes the links and namespaces the cluster made, by name; a cluster whose owner
    was SIGKILLed is removed, namespaces included, by the next start's reap_stale_clusters."""
    from tests.cluster import netns
    from tests.cluster.fixtures import _unavailable
    from tests.cluster.slurm import STATE_PREFIX, LocalSlurm, ensure_installed, reap_stale_clusters

    if os.geteuid() != 0 or (why := netns.available()):
        _unavailable(f"network namespaces cannot be made here: {why or 'not root'}")
    ensure_installed()  # run alone (-m multinode) this test is the first to need SLURM
    with LocalSlurm(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"), nodes=2) as cluster:
        made = set(cluster.net.made)
        assert {m for m in made if not m.startswith("etc:")} <= _net_names()
        assert cluster.node_state().split() == ["idle", "idle"]
    assert not made & _net_names()
    assert not any((Path("/etc/netns") / m.split(":", 1)[1]).exists() for m in made if m.startswith("etc:"))
    shutil.rmtree(cluster.state_dir)

    # an owner killed with its cluster running: nothing ran its teardown
    code = (
        "import sys, tempfile, time; from tests.cluster.slurm import LocalSlurm, STATE_PREFIX\n"
        "c = LocalSlurm(tempfile.mkdtemp(prefix=STATE_PREFIX, dir='/tmp'), nodes=2); c.start()\n"
        "print(c.state_dir, flush=True); time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        state_dir = Path(owner.stdout.readline().strip())
    finally:
        owner.kill()
        owner.wait(timeout=30)
    left = set(netns.NodeNet.load(state_dir / "net.json").made)
    assert {m for m in left if not m.startswith("etc:")} <= _net_names()
    assert state_dir in reap_stale_clusters()
    assert not left & _net_names() and not state_dir.exists()
