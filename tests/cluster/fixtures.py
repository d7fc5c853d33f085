"""pytest fixtures ``slurm_cluster`` and ``slurm_two_nodes``: real SLURM clusters for the session.

``slurm_cluster`` has one node (this machine); ``slurm_two_nodes`` has two (``cluster.node_names``:
``trd`` + five characters of the cluster's own state folder + ``n1``/``n2``, so two test sessions on
one machine never share a node, namespace, link or folder; each removes only what it made), each a ``slurmd`` in its own network namespace on a private bridge
(tests/cluster/netns.py). Tests using the second are marked ``multinode`` by conftest.py
(``pytest -m multinode`` runs just them).

Use it from ``tests/conftest.py``::

    from tests.cluster.fixtures import slurm_cluster  # noqa: F401

and in a test::

    @pytest.mark.slurm
    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch(["--wrap", "python -c 'print(1)'"], cwd=tmp_path, wait=True)
        assert slurm_cluster.job_state(job) == "COMPLETED"

Needs root on Linux (Debian 12): it apt-get installs SLURM, munge, slurmdbd and
MariaDB when missing, starts private daemons in a fresh folder
``/tmp/trd-slurm-*`` (about 3 s), and at teardown cancels every job, stops the
daemons it started (by PID file) and removes the folder. Elsewhere it skips,
except under ``CI=true``, where the cluster must run and the test fails instead.
Set ``TRD_KEEP_SLURM_STATE=1`` to keep the folder (configs and daemon logs)
until the next start, which stops and removes clusters whose owner is gone.

The fixtures are reference-counted, so a test module may import them as well as
``conftest.py`` without a second cluster being started.

The same clusters by hand (as root, from the repository; Ctrl-C stops and removes them)::

    .venv/bin/python -m tests.cluster --nodes 2
    export SLURM_CONF=/tmp/trd-slurm-XXXX/slurm.conf   # printed by the command
    sbatch --nodes=2 --ntasks-per-node=1 --wrap 'srun hostname'
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import netns
from tests.cluster.slurm import (
    STATE_PREFIX,
    LocalSlurm,
    SlurmError,
    ensure_installed,
    reap_stale_clusters,
)

# per node count: the running cluster, how many fixtures use it, why it could not start
_shared: dict[int, dict[str, object]] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"local SLURM cluster needed in CI but {reason}", pytrace=False)
    pytest.skip(reason)


def _start(nodes: int = 1) -> LocalSlurm:
    if not sys.platform.startswith("linux"):
        _unavailable(f"the local SLURM cluster needs Linux, not {sys.platform}")
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster must be started as root (it runs daemons)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld", path="/usr/sbin") is None:
        _unavailable("SLURM is not installed and there is no apt-get to install it")
    if nodes > 1 and (why := netns.available()):
        _unavailable(f"a {nodes}-node cluster needs network namespaces: {why}")
    ensure_installed()
    reap_stale_clusters()
    first_error = None
    # Two tries: the free ports are picked before the daemons bind them, and
    # another process may take one in between.
    for _ in range(2):
        # /tmp, not pytest's tmp_path: the munge user must traverse the
        # folder, and unix socket paths must stay short
        state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"))
        cluster = LocalSlurm(state, nodes=nodes)
        try:
            cluster.start()
            return cluster
        except SlurmError as exc:
            _remove(cluster)
            if first_error is not None:
                raise SlurmError(f"{exc}\n(first try: {first_error})") from exc
            first_error = exc
        except BaseException:
            _remove(cluster)
            raise
    raise AssertionError("unreachable")


def _remove(cluster: LocalSlurm) -> None:
    if os.environ.get("TRD_KEEP_SLURM_STATE"):
        return
    if not cluster.running():
        shutil.rmtree(cluster.state_dir, ignore_errors=True)


def _cluster(nodes: int) -> Iterator[LocalSlurm]:
    shared = _shared.setdefault(nodes, {"cluster": None, "users": 0, "error": None})
    if shared["error"]:  # failed once this session: do not retry for every test
        pytest.fail(str(shared["error"]), pytrace=False)
    cluster = shared["cluster"]
    if cluster is None:
        try:
            cluster = _start(nodes)
        except SlurmError as exc:
            shared["error"] = f"could not start the local {nodes}-node SLURM cluster: {exc}"
            pytest.fail(str(shared["error"]), pytrace=False)
        shared["cluster"] = cluster
    shared["users"] = int(shared["users"]) + 1
    try:
        yield cluster
    finally:
        shared["users"] = int(shared["users"]) - 1
        if shared["users"] == 0:
            shared["cluster"] = None
            try:
                cluster.cancel_all()
            finally:
                cluster.stop()
                _remove(cluster)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """A running one-node SLURM cluster (see the module docstring)."""
    yield from _cluster(1)


@pytest.fixture(scope="session")
def slurm_two_nodes() -> Iterator[LocalSlurm]:
    """A running two-node SLURM cluster, nodes ``node_names`` (see the module docstring)."""
    yield from _cluster(2)
