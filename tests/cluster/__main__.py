"""Start the test suite's local SLURM cluster by hand, until Ctrl-C (as root, from the repository).

    .venv/bin/python -m tests.cluster [--nodes 2]

prints the ``export SLURM_CONF=...`` line that points sbatch, srun, squeue and sacct at it;
Ctrl-C (or SIGTERM) cancels its jobs, stops its daemons and removes its folder, and, with
``--nodes 2``, the namespaces, links and hosts files it made.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
from pathlib import Path

from tests.cluster import netns
from tests.cluster.slurm import STATE_PREFIX, LocalSlurm, ensure_installed, reap_stale_clusters


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1, help="1: this machine; 2 or more: one network namespace each")
    ap.add_argument("--keep", action="store_true", help="keep the folder (configs, daemon logs) after stopping")
    a = ap.parse_args()
    if a.nodes < 1:
        ap.error("--nodes must be at least 1")
    if a.nodes > 1 and (why := netns.available()):
        ap.error(why)
    ensure_installed()
    reap_stale_clusters()
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp")), nodes=a.nodes)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        cluster.start()
        print(
            f"{a.nodes}-node SLURM cluster up in {cluster.startup_seconds:.1f} s: nodes {', '.join(cluster.node_names)}"
        )
        if cluster.net is not None:
            print(
                f"LAN {cluster.net.network}: controller {cluster.net.controller_addr}, "
                + ", ".join(f"{h} {cluster.net.addr(i)}" for i, h in enumerate(cluster.node_names, 1))
            )
        print(f"export SLURM_CONF={cluster.conf}")
        print("Ctrl-C to stop it", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        if not a.keep:
            shutil.rmtree(cluster.state_dir, ignore_errors=True)
        print("stopped")


if __name__ == "__main__":
    main()
