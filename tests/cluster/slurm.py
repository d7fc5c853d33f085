"""A real (no mocks) one-node SLURM cluster for the test suite.

``LocalSlurm(state_dir)`` runs, as root on Debian 12 (SLURM 22.05, munge 0.5,
MariaDB 10.11), its own private set of daemons, all configured by files in
``state_dir`` and stopped by their PID files:

* ``munged``  - as the ``munge`` user, like Debian's service (as root with a
  munge-owned key it refuses: "Keyfile is insecure"), with a fresh key and its
  socket in ``state_dir/munge``; a system munged (``/run/munge``), running or
  not, is neither used nor touched, so nothing of ours outlives ``stop()``;
* ``mariadbd`` - a fresh data directory in ``state_dir/mysql``, on a free
  127.0.0.1 port (slurmdbd 22.05 has no option for a unix socket);
* ``slurmdbd`` - so that ``sacct`` works (submitit reads job states with it;
  without accounting it reports UNKNOWN and ``job.result()`` can wait forever);
  a fresh database per ``state_dir`` means job ids never meet old records;
* ``slurmctld`` and ``slurmd`` - one node named after ``hostname -s``;
  or, with ``nodes=2`` (or more), one ``slurmd`` per node, each in its own network
  and UTS namespace (``tests/cluster/netns.py``): nodes ``trdXXXXXn1``, ``trdXXXXXn2``... (named per cluster, from its state folder) on a
  private bridge, each with its own address and host name, ``slurmctld`` and
  ``slurmdbd`` on the bridge's address, munge shared through its socket file.

Every client call gets ``env()`` (``SLURM_CONF=state_dir/slurm.conf``); nothing
is written to ``/etc/slurm``. slurmdbd has no ``-f`` option: it reads
``slurmdbd.conf`` from the directory of ``SLURM_CONF``, which is ``state_dir``.

Traps met on the way (all handled below):

* clients authenticate to slurmdbd with ``AccountingStoragePass`` as their
  munge options, not ``AuthInfo``: without ``AccountingStoragePass=<socket>``
  sacctmgr/sacct/slurmctld go to /run/munge/munge.socket.2;
* ``sbatch --wait`` polls 2, 8, 32, 32... s apart and fails with "Job N no
  longer found" if ``MinJobAge`` purged the job meanwhile: MinJobAge=60;
* ``AuthInfo=cred_expire=10`` is in the config from the start (a requeued job
  restarts after ~12 s instead of ~150 s; ``scontrol reconfigure`` would not do);
* killing slurmd leaves job processes: ``stop()`` cancels jobs first, and kills
  any process left with this cluster's ``SLURM_CONF`` and a ``SLURM_JOB_ID``;
* slurmdbd 22.05 cannot use a MySQL unix socket: MariaDB listens on a free
  127.0.0.1 port, with fsync off (a busy disk otherwise adds seconds).

Every wait in this module is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.netns import NetError, NodeNet

__all__ = [
    "FINAL_STATES",
    "LocalSlurm",
    "SlurmError",
    "ensure_installed",
    "reap_stale_clusters",
]

# Job states after which a job will not run again (REQUEUED is not final).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)

_APT_PACKAGES = [
    "slurmctld",
    "slurmd",
    "slurm-client",
    "munge",
    "slurmdbd",
    "mariadb-server",
]
# Programs this module runs, and the package that brings each.
_PROGRAMS = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "slurmdbd": "slurmdbd",
    "sbatch": "slurm-client",
    "munged": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
}
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
_INSTALL_LOCK = Path("/tmp/trd-hpc-slurm-install.lock")


class SlurmError(RuntimeError):
    """The local cluster could not be started, or a client call failed."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _missing_programs() -> list[str]:
    return [p for p in _PROGRAMS if _which(p) is None]


def ensure_installed(timeout: float = 900.0) -> None:
    """Install SLURM, munge, slurmdbd and MariaDB from Debian if any is missing.

    Runs ``apt-get update`` once, then ``apt-get install`` (as root, with
    ``DEBIAN_FRONTEND=noninteractive``); ~15-40 s on a fresh Debian 12. A file
    lock keeps two test processes from running apt at once.
    """
    if not _missing_programs():
        return
    if os.geteuid() != 0:
        raise SlurmError(f"missing {', '.join(_missing_programs())} and not root: cannot apt-get install")
    if _which("apt-get") is None:
        raise SlurmError("missing SLURM programs and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _missing_programs():  # another process installed them meanwhile
                return
            for cmd in (
                ["apt-get", "update", "-q"],
                [
                    "apt-get",
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    *_APT_PACKAGES,
                ],
            ):
                left = max(1.0, deadline - time.monotonic())
                try:
                    res = subprocess.run(
                        cmd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        text=True,
                        timeout=left,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise SlurmError(f"{' '.join(cmd)} timed out after {left:.0f}s") from exc
                if res.returncode != 0:
                    raise SlurmError(
                        f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
                    )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    still = _missing_programs()
    if still:
        raise SlurmError(f"still missing after apt-get install: {', '.join(still)}")


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 3 is the state; a zombie ("Z") has exited already
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _proc_text(pid: int, what: str) -> str:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class _Daemon:
    name: str
    pidfile: Path
    log: Path
    proc: subprocess.Popen | None = None


class LocalSlurm:
    """A private one-node SLURM cluster whose files all live in ``state_dir``.

    ``state_dir`` must be reachable by the ``munge`` user (it is chmod 0755 by
    ``start()``; its parents must be traversable, e.g. a ``tempfile.mkdtemp``
    folder in /tmp, not pytest's 0700 ``tmp_path``), and short enough for a
    unix socket path (< 100 bytes).
    """

    CLUSTER_NAME = "trdtest"
    PARTITION = "debug"

    @property
    def node_prefix(self) -> str:
        """``trd`` + 5 host-name-safe characters of the state folder's random suffix."""
        tag = self.state_dir.name.removeprefix(STATE_PREFIX).lower()
        return "trd" + "".join(c if c.isalnum() else "x" for c in tag)[:5]

    def __init__(self, state_dir: Path | str, nodes: int = 1):
        self.state_dir = Path(state_dir).resolve()
        # a cluster started earlier (reap_stale_clusters) says how many nodes it had
        self.net_file = self.state_dir / "net.json"
        self.net = NodeNet.load(self.net_file)
        if self.net is not None:
            nodes = self.net.n
        self.nodes = nodes
        self.conf = self.state_dir / "slurm.conf"
        self.dbd_conf = self.state_dir / "slurmdbd.conf"
        self.munge_dir = self.state_dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.db_dir = self.state_dir / "mysql"
        self.log_dir = self.state_dir / "log"
        self.run_dir = self.state_dir / "run"
        self.hostname = socket.gethostname().split(".")[0]
        # Node names of their own per cluster (from its state folder's random suffix), so two test
        # sessions' clusters on one machine never share a node, namespace or link name.
        self.node_names = [self.hostname] if nodes == 1 else [f"{self.node_prefix}n{i}" for i in range(1, nodes + 1)]
        # what nproc says (CPU affinity), at most what slurmd detects
        self.cpus = len(os.sched_getaffinity(0)) or 1
        self.real_memory_mb = 0
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self.timings: dict[str, float] = {}  # start-up phase -> seconds since start()
        self._daemons: dict[str, _Daemon] = {
            name: _Daemon(name, self.run_dir / f"{name}.pid", self.log_dir / f"{name}.log")
            for name in ("munged", "mariadbd", "slurmdbd", "slurmctld", *self._slurmds())
        }
        # munged runs as the munge user: its PID and log files live in its folder
        self._daemons["munged"].pidfile = self.munge_dir / "munged.pid"
        self._daemons["munged"].log = self.munge_dir / "munged.log"
        self.owner_lock = self.state_dir / "owner.lock"
        self._lock_file = None

    def _slurmds(self) -> list[str]:
        return ["slurmd"] if self.nodes == 1 else [f"slurmd-{n}" for n in self.node_names]

    @property
    def controller_addr(self) -> str:
        return "127.0.0.1" if self.net is None else self.net.controller_addr

    # ------------------------------------------------------------------ env
    def env(self) -> dict[str, str]:
        """Variables a client subprocess needs (merge into os.environ)."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ without inherited SLURM_*/SBATCH_* variables, plus env()."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SACCT_"))
        }
        env.update(self.env())
        if extra:
            env.update(extra)
        return env

    def run(self, cmd: list[str], timeout: float = 30.0, check: bool = True, **kw):
        """Run a SLURM client command against this cluster (bounded)."""
        kw.setdefault("env", self.client_env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}".strip())
        return res

    # --------------------------------------------------------------- config
    def _detect_memory_mb(self) -> int:
        total_kb = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total_kb = int(line.split()[1])
        # slurmd must detect at least RealMemory or the node drains; 90 % is safe
        return max(256, int(total_kb / 1024 * 0.9))

    def _write_configs(self) -> None:
        p = self.ports
        mem = self.real_memory_mb
        def_mem = max(64, mem // self.cpus // 2)
        auth_info = f"cred_expire=10,socket={self.munge_socket}"
        ctl = self.controller_addr
        if self.nodes == 1:
            node_lines = f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            per_node = ""  # one slurmd: its files need no node name
        else:
            # every node claims this machine's CPUs and memory: slurmd checks them against
            # what it detects, and the nodes share the one machine
            node_lines = "\n".join(
                f"NodeName={n} NodeAddr={self.net.addr(i)} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
                for i, n in enumerate(self.node_names, 1)
            )
            per_node = "-%n"  # SLURM puts the node name in for %n
        slurm_conf = f"""\
# Private one-node test cluster; generated by tests/cluster/slurm.py
ClusterName={self.CLUSTER_NAME}
SlurmctldHost={self.hostname}({ctl})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={p["slurmctld"]}
SlurmdPort={p["slurmd"]}
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job restarts after ~25 s instead of ~150 s
AuthInfo={auth_info}
# clients talk to slurmdbd with AccountingStoragePass as their munge options,
# not AuthInfo: without it they use the system socket /run/munge/munge.socket.2
AccountingStoragePass={self.munge_socket}
StateSaveLocation={self.state_dir / "ctld"}
SlurmdSpoolDir={self.state_dir / "spool"}{per_node}
SlurmctldPidFile={self._daemons["slurmctld"].pidfile}
SlurmdPidFile={self.run_dir}/slurmd{per_node}.pid
SlurmctldLogFile={self._daemons["slurmctld"].log}
SlurmdLogFile={self.log_dir}/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={self.state_dir / "plugstack.conf"}
MailProg=/bin/true
MpiDefault=none
# no cgroups in the test machines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU={def_mem}
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={ctl}
AccountingStoragePort={p["slurmdbd"]}
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=0,batch_sched_delay=0
# sbatch --wait polls up to 32 s apart: a smaller MinJobAge can purge a job
# before it looks, and it then fails "Job N no longer found"
MinJobAge=60
KillWait=2
InactiveLimit=0
ReturnToService=2
SlurmdTimeout=60
MessageTimeout=10
{node_lines}
PartitionName={self.PARTITION} Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""
        dbd_conf = f"""\
# generated by tests/cluster/slurm.py
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost={self.hostname}
DbdAddr={ctl}
DbdPort={p["slurmdbd"]}
SlurmUser=root
PidFile={self._daemons["slurmdbd"].pidfile}
LogFile={self._daemons["slurmdbd"].log}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={p["mariadb"]}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
        self.conf.write_text(slurm_conf)
        (self.state_dir / "plugstack.conf").write_text("")
        # slurmdbd refuses a slurmdbd.conf readable by others
        fd = os.open(self.dbd_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(dbd_conf)
        os.chmod(self.dbd_conf, 0o600)

    # --------------------------------------------------------------- daemons
    def _daemon_env(self) -> dict[str, str]:
        return self.client_env()

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        d = self._daemons[name]
        out = open(self.log_dir / f"{name}.out", "ab")
        try:
            d.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=kw.pop("env", self._daemon_env()),
                start_new_session=True,
                close_fds=True,
                **kw,
            )
        finally:
            out.close()

    def _wait_for(self, what: str, ok, timeout: float, daemon: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if ok():
                return
            if daemon:
                d = self._daemons[daemon]
                if d.proc is not None and d.proc.poll() is not None:
                    raise SlurmError(
                        f"{daemon} exited ({d.proc.returncode}) before {what}:\n"
                        f"{_tail(self.log_dir / (daemon + '.out'))}\n{_tail(d.log)}"
                    )
            if time.monotonic() > deadline:
                logs = ""
                if daemon:
                    d = self._daemons[daemon]
                    logs = f"\n{_tail(self.log_dir / (daemon + '.out'))}\n{_tail(d.log)}"
                raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}{logs}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self.munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        d = self._daemons["munged"]
        self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d.pidfile}",
                f"--log-file={d.log}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
                "--num-threads=2",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
            cwd=self.munge_dir,
        )

    def _mariadb_args(self) -> list[str]:
        return [
            "--no-defaults",
            f"--datadir={self.db_dir}",
            "--user=root",
            "--skip-name-resolve",
            "--innodb-log-file-size=8M",
            "--innodb-buffer-pool-size=32M",
            # a throwaway database: no fsync (a busy disk made start-up take 4 s more)
            "--innodb-flush-method=nosync",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
        ]

    def _init_mariadb(self) -> subprocess.Popen:
        out = open(self.log_dir / "mariadb-install-db.out", "wb")
        try:
            return subprocess.Popen(
                [
                    _which("mariadb-install-db") or "mariadb-install-db",
                    *self._mariadb_args(),
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                cwd=self.state_dir,
            )
        finally:
            out.close()

    def _start_mariadb(self) -> None:
        init_sql = self.state_dir / "mysql-init.sql"
        init_sql.write_text(
            "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';\n"
            "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';\n"
            "FLUSH PRIVILEGES;\n"
        )
        d = self._daemons["mariadbd"]
        self._spawn(
            "mariadbd",
            [
                _which("mariadbd") or "mariadbd",
                *self._mariadb_args(),
                f"--socket={self.run_dir / 'mysqld.sock'}",
                f"--port={self.ports['mariadb']}",
                "--bind-address=127.0.0.1",
                f"--pid-file={d.pidfile}",
                f"--log-error={d.log}",
                f"--init-file={init_sql}",
                "--skip-log-bin",
                "--performance-schema=OFF",
                "--max-connections=50",
            ],
            cwd=self.state_dir,
        )

    def start(self, timeout: float = 120.0) -> None:
        """Start munged, MariaDB, slurmdbd, slurmctld and slurmd; wait until idle."""
        t0 = time.monotonic()
        deadline = t0 + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        def mark(phase: str) -> None:
            self.timings[phase] = round(time.monotonic() - t0, 3)

        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.munge_dir.exists() or self.db_dir.exists():
            raise SlurmError(f"{self.state_dir} was used before: give each start a fresh state_dir")
        os.chmod(self.state_dir, 0o755)  # the munge user must reach its socket
        # Held while the cluster runs: a free lock means its owner is gone
        # (see reap_stale_clusters). Taken before slurm.conf is written.
        self._lock_file = open(self.owner_lock, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise SlurmError(f"{self.state_dir} is in use by another LocalSlurm") from None
        for sub in ("log", "run", "ctld"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        if self.nodes == 1:
            (self.state_dir / "spool").mkdir(exist_ok=True)
        if self.nodes > 1:
            try:
                # the tag makes the link and namespace names this cluster's own
                self.net = NodeNet(tag=self.state_dir.name.removeprefix(STATE_PREFIX)[:8], n=self.nodes)
                self.net.up(self.node_names, save_to=self.net_file)
            except NetError as exc:
                self.stop()
                raise SlurmError(f"could not make the {self.nodes} nodes' network: {exc}") from exc
        self.real_memory_mb = self._detect_memory_mb()
        ports = _free_ports(4)
        self.ports = dict(zip(("slurmctld", "slurmd", "slurmdbd", "mariadb"), ports))
        self._write_configs()
        try:
            installer = self._init_mariadb()  # ~1 s; runs while munged starts
            self._start_munged()
            try:
                rc = installer.wait(timeout=left())
            except subprocess.TimeoutExpired:
                installer.kill()
                installer.wait(5)
                raise SlurmError("mariadb-install-db timed out") from None
            if rc != 0:
                raise SlurmError(f"mariadb-install-db failed ({rc}):\n{_tail(self.log_dir / 'mariadb-install-db.out')}")
            mark("mariadb-install-db")
            self._start_mariadb()
            self._wait_for("munged socket", self.munge_socket.exists, left(), "munged")
            self._wait_for("MariaDB port", lambda: _port_open(self.ports["mariadb"]), left(), "mariadbd")
            mark("mariadbd")
            self._spawn("slurmdbd", [_which("slurmdbd") or "slurmdbd", "-D"], cwd=self.state_dir)
            # slurmdbd creates its tables (a few seconds) before it listens
            self._wait_for("slurmdbd port", lambda: _port_open(self.ports["slurmdbd"]), left(), "slurmdbd")
            mark("slurmdbd")
            # register the cluster before slurmctld connects (so it needs no retry)
            self.run(
                ["sacctmgr", "-i", "add", "cluster", self.CLUSTER_NAME],
                timeout=left(),
            )
            self._spawn(
                "slurmctld",
                [_which("slurmctld") or "slurmctld", "-D", "-f", str(self.conf)],
                cwd=self.state_dir,
            )
            self._wait_for("slurmctld to answer", self._ctld_up, left(), "slurmctld")
            mark("slurmctld")
            slurmd = _which("slurmd") or "slurmd"
            if self.net is None:
                self._spawn("slurmd", [slurmd, "-D", "-f", str(self.conf)], cwd=self.state_dir)
            else:
                for i, (daemon, node) in enumerate(zip(self._slurmds(), self.node_names), 1):
                    (self.state_dir / f"spool-{node}").mkdir(exist_ok=True)
                    cmd = self.net.wrap(i, [slurmd, "-D", "-N", node, "-f", str(self.conf)])
                    self._spawn(daemon, cmd, cwd=self.state_dir)
            self.wait_idle(timeout=left())
            mark("node idle")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        (self.log_dir / "startup-timings.txt").write_text("".join(f"{k}\t{v}\n" for k, v in self.timings.items()))

    def _ctld_up(self) -> bool:
        try:
            res = self.run(["scontrol", "ping"], timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
        return "UP" in res.stdout

    def node_state(self) -> str:
        """The nodes' states, one per line (``idle``, ``mixed``, ...; ``*`` = not responding)."""
        res = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=15, check=False)
        return res.stdout.strip()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait (bounded) until every node is idle, i.e. ready to run jobs."""

        def idle() -> bool:
            for name in self._slurmds():  # a slurmd that died will not come back
                d = self._daemons[name]
                if d.proc is not None and d.proc.poll() is not None:
                    raise SlurmError(
                        f"{name} exited ({d.proc.returncode}) before its node was idle:\n"
                        f"{_tail(self.log_dir / (name + '.out'))}\n{_tail(d.log)}"
                    )
            states = [st.rstrip("*") for st in self.node_state().split()]
            return len(states) == self.nodes and all(st == "idle" for st in states)

        try:
            self._wait_for(f"{self.nodes} node(s) to be idle", idle, timeout)
        except SlurmError as exc:
            raise SlurmError(f"{exc}\n{self.logs()}") from None

    # ------------------------------------------------------------------ jobs
    def sbatch(
        self,
        args: list[str],
        cwd: Path | str | None = None,
        wait: bool = False,
        timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> int:
        """Submit ``sbatch --parsable *args`` and return the job id.

        ``env`` is merged over ``client_env()`` (e.g. a PATH with the repo's
        venv first); sbatch exports that environment into the job. If ``args``
        holds ``--wait`` sbatch itself blocks (at most ``timeout`` s); with
        ``wait=True`` this method polls instead (finer-grained than sbatch's
        2-32 s steps) and returns once the job has a final state. Either way a
        job not finished within ``timeout`` is cancelled and TimeoutError raised.
        """
        cmd = [_which("sbatch") or "sbatch", "--parsable", *args]
        t0 = time.monotonic()
        try:
            res = subprocess.run(
                cmd,
                cwd=cwd,
                env=self.client_env(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            m = re.match(r"\s*(\d+)", out)
            if m:
                self.run(["scancel", m.group(1)], timeout=15, check=False)
            raise TimeoutError(f"sbatch {' '.join(args)} did not return in {timeout}s") from exc
        m = re.match(r"\s*(\d+)", res.stdout)
        if not m:
            raise SlurmError(f"sbatch {' '.join(args)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        job_id = int(m.group(1))
        if wait:
            self.wait_job(job_id, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        return job_id

    def job_state(self, job_id: int | str) -> str | None:
        """The job's state (e.g. PENDING, RUNNING, COMPLETED), or None if unknown.

        Asks slurmctld first and sacct once slurmctld has forgotten the job.
        """
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15, check=False)
        if res.returncode == 0:
            m = re.search(r"\bJobState=(\S+)", res.stdout)
            if m:
                return m.group(1)
        res = self.run(
            ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"],
            timeout=15,
            check=False,
        )
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        if res.returncode == 0 and lines:
            return lines[0].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
        return None

    def sacct_state(self, job_id: int | str) -> str | None:
        """The job's state as the accounting database has it (what submitit reads)."""
        res = self.run(
            ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"],
            timeout=15,
            check=False,
        )
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        return lines[0].split()[0] if res.returncode == 0 and lines else None

    def array_records(
        self, job_id: int | str, n: int, fields: tuple[str, ...] = ("State",), timeout: float = 60.0
    ) -> dict[str, list[str]]:
        """Wait (bounded) until the ``n`` tasks of array ``job_id`` have final states in the
        accounting database; return ``{task id: [state, *other fields]}``.

        slurmctld sends job records to slurmdbd from a queue, so sacct lags behind squeue: a task
        squeue no longer lists can still read RUNNING there for a moment (more so on a busy machine).
        """
        cols = ",".join(("JobID", "State") + tuple(f for f in fields if f != "State"))
        deadline = time.monotonic() + timeout
        while True:
            res = self.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", cols], timeout=15, check=False)
            rows = [ln.split("|") for ln in res.stdout.splitlines() if "|" in ln]
            recs = {r[0]: [r[1].split()[0] if r[1].strip() else r[1], *r[2:]] for r in rows}  # "CANCELLED by 0"
            if len(recs) == n and all(v[0] in FINAL_STATES for v in recs.values()):
                return recs
            if time.monotonic() > deadline:
                raise TimeoutError(f"array job {job_id} not finished in accounting after {timeout:.0f} s: {recs}")
            time.sleep(0.5)

    def wait_job(self, job_id: int | str, timeout: float = 300.0) -> str:
        """Wait (bounded) for a final state and return it; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        state = None
        while True:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def active_jobs(self) -> list[str]:
        res = self.run(["squeue", "-h", "-o", "%A"], timeout=15, check=False)
        return [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]

    def cancel_all(self, timeout: float = 60.0) -> None:
        """Cancel every job and wait (bounded) until none is left in the queue."""
        jobs = self.active_jobs()
        if not jobs:
            return
        self.run(["scancel", *jobs], timeout=30, check=False)
        deadline = time.monotonic() + timeout
        while self.active_jobs() and time.monotonic() < deadline:
            time.sleep(0.5)

    # ------------------------------------------------------------------ stop
    def _owned(self, pid: int) -> bool:
        """Does pid belong to this cluster (state_dir in its cmdline or environ)?"""
        marker = str(self.state_dir)
        return marker in _proc_text(pid, "cmdline") or marker in _proc_text(pid, "environ")

    def _daemon_pid(self, d: _Daemon) -> int | None:
        try:
            pid = int(d.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is not None and _pid_alive(pid) and self._owned(pid):
            return pid
        if d.proc is not None and d.proc.poll() is None:
            return d.proc.pid  # started, but has not written its PID file yet
        return None

    def _terminate(self, names: list[str], timeout: float = 15.0) -> None:
        pids = {}
        for name in names:
            d = self._daemons[name]
            pid = self._daemon_pid(d)
            if pid is not None:
                pids[name] = pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, pid in pids.items():
            d = self._daemons[name]
            while _pid_alive(pid) and time.monotonic() < deadline:
                if d.proc is not None and d.proc.pid == pid:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        d.proc.wait(timeout=0.2)
                else:
                    time.sleep(0.1)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in names:  # reap what we started
            d = self._daemons[name]
            if d.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    d.proc.wait(timeout=5)
                if d.proc.poll() is None:
                    d.proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        d.proc.wait(timeout=5)

    def _kill_job_leftovers(self) -> None:
        """Kill job processes (and slurmstepds) of this cluster that outlived slurmd."""
        marker = f"SLURM_CONF={self.conf}\n"
        keep = _ancestors()
        victims = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in keep:
                continue
            pid = int(entry)
            environ = _proc_text(pid, "environ")
            if marker not in environ:
                continue
            comm = _proc_text(pid, "comm").strip()
            if "SLURM_JOB_ID=" in environ or comm.startswith("slurmstepd"):
                victims.append(pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, cancel_jobs: bool = True) -> None:
        """Cancel jobs, then stop the daemons this cluster started (by PID file)."""
        if cancel_jobs and self._daemon_pid(self._daemons["slurmctld"]) is not None:
            with contextlib.suppress(Exception):
                self.cancel_all(timeout=30)
        self._terminate([*self._slurmds(), "slurmctld"])
        self._kill_job_leftovers()
        self._terminate(["slurmdbd"])
        self._terminate(["mariadbd"])
        self._terminate(["munged"])
        if self.net is not None:
            left = self.net.remove()
            self.net.save(self.net_file)
            if left:
                raise SlurmError(f"could not remove {', '.join(left)} (see {self.net_file})")
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def logs(self, n: int = 2000) -> str:
        """Tails of every daemon log, for failure messages."""
        parts = []
        for d in self._daemons.values():
            parts.append(f"--- {d.name} ---\n{_tail(d.log, n)}")
        return "\n".join(parts)

    def running(self) -> bool:
        """Is any of this cluster's daemons alive?"""
        return any(self._daemon_pid(d) is not None for d in self._daemons.values())

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


STATE_PREFIX = "trd-slurm-"


def reap_stale_clusters(base: Path | str = "/tmp", prefix: str = STATE_PREFIX) -> list[Path]:
    """Stop and delete clusters left behind by test processes that died.

    A cluster is stale when nobody holds its ``owner.lock`` any more (its
    owner was killed before teardown). Live clusters of concurrent test runs
    hold their lock and are left alone. Returns the folders removed.
    """
    removed = []
    for d in sorted(Path(base).glob(prefix + "*")):
        lock_path = d / "owner.lock"
        if not (d / "slurm.conf").exists() or not lock_path.exists():
            continue
        try:
            lock = open(lock_path, "a")
        except OSError:
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            LocalSlurm(d).stop(cancel_jobs=True)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
