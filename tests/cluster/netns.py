"""Network namespaces that make one machine look like several hosts on a private LAN.

``NodeNet(tag, n)`` makes, as root with ``ip`` (iproute2):

* a bridge ``trdb<tag>`` in the current namespace holding the LAN's first address
  (the controller's: slurmctld and slurmdbd listen there);
* per node *i* a namespace ``trd-<tag>-n<i>`` with loopback up and ``eth0`` (one end of
  the veth pair ``trdv<tag><i>``, the other end on the bridge) holding the address ``.1<i>``;
* ``/etc/netns/<namespace>/hosts``, where every node name resolves to its LAN address, as
  on a real cluster (gloo and the Ray head find their address from the host name).

``wrap(i, cmd)`` runs ``cmd`` inside node *i*'s network namespace with that hosts file
over ``/etc/hosts`` and its own UTS namespace and host name, so ``hostname`` in a job
names the node it runs on. The LAN is a documentation
range (RFC 5737) not already used by any interface or route here, so traffic never leaves
the machine. ``remove()`` deletes exactly the links, namespaces and hosts files it names;
``NodeNet.load(path)`` rebuilds the object from the JSON that ``save(path)`` wrote, so a
later process can remove what a killed one made.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

# RFC 5737 documentation ranges first, then RFC 2544's benchmark range in /24 steps.
_CANDIDATES = [
    "198.51.100.0/24",
    "203.0.113.0/24",
    "192.0.2.0/24",
    *(f"198.18.{k}.0/24" for k in range(256)),
]
_NETNS_ETC = Path("/etc/netns")


class NetError(RuntimeError):
    """The namespaces or links could not be made."""


@contextlib.contextmanager
def _network_lock():
    """An flock on /run/lock (or /tmp): held while a cluster picks its LAN and claims it."""
    base = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
    with open(base / "trd-test-lan.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise NetError(f"ip {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`, which is not installed"
    probe = "trd-probe-netns"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot make a network namespace: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for args in (("-j", "-4", "addr"), ("-j", "-4", "route")):
        try:
            rows = json.loads(_ip(*args).stdout or "[]")
        except (NetError, ValueError):
            continue
        for row in rows:
            for a in row.get("addr_info", []):
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
            dst = row.get("dst")
            if dst and dst != "default":
                nets.append(ipaddress.ip_network(dst, strict=False))
    return nets


def free_network() -> ipaddress.IPv4Network:
    used = _networks_in_use()
    for cand in map(ipaddress.ip_network, _CANDIDATES):
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise NetError("no free documentation or benchmark /24 left for the test LAN")


@dataclass
class NodeNet:
    tag: str
    n: int
    network: str = ""
    hostnames: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # "link:NAME", "netns:NAME", "etc:NAME", in order made

    @property
    def bridge(self) -> str:
        return f"trdb{self.tag}"

    def netns(self, i: int) -> str:
        return f"trd-{self.tag}-n{i}"

    def veth(self, i: int) -> str:
        return f"trdv{self.tag}{i}"

    @property
    def controller_addr(self) -> str:
        return str(ipaddress.ip_network(self.network)[1])

    def addr(self, i: int) -> str:
        return str(ipaddress.ip_network(self.network)[10 + i])

    def up(self, hostnames: list[str], save_to: Path | None = None) -> None:
        """Make the bridge, the namespaces and the hosts files (``hostnames[i-1]`` is node *i*).

        ``save_to`` is written after every step, so a crash half-way leaves a record of what
        to remove."""
        if len(self.bridge) > 15 or len(self.veth(self.n)) > 15:
            raise NetError(f"tag {self.tag!r} too long for a Linux interface name (15 characters)")
        self.hostnames = list(hostnames)

        def made(kind: str, name: str) -> None:
            self.made.append(f"{kind}:{name}")
            if save_to is not None:
                self.save(save_to)

        # Two test sessions starting clusters at once would both find the same /24 free:
        # choosing it and putting it on this cluster's bridge is one step under a host-wide lock.
        with _network_lock():
            self.network = str(free_network())
            prefix = ipaddress.ip_network(self.network).prefixlen
            _ip("link", "add", self.bridge, "type", "bridge")
            made("link", self.bridge)
            _ip("addr", "add", f"{self.controller_addr}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addr(i)} {h}\n" for i, h in enumerate(self.hostnames, 1))
        for i in range(1, self.n + 1):
            ns = self.netns(i)
            _ip("netns", "add", ns)
            made("netns", ns)
            _ip("link", "add", self.veth(i), "type", "veth", "peer", "name", "eth0", "netns", ns)
            made("link", self.veth(i))
            _ip("link", "set", self.veth(i), "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = _NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            made("etc", ns)
            (etc / "hosts").write_text(hosts)

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` run inside node *i*: its network namespace, its own host name and /etc/hosts.

        Not ``ip netns exec``: it remounts /sys for the namespace, which hides
        /sys/fs/cgroup, and slurmd then refuses to start. A private mount namespace with
        the node's hosts file bind-mounted over /etc/hosts does the part needed here.
        nsenter and unshare (without --fork) exec in place, so the PID stays cmd's."""
        host, hosts = self.hostnames[i - 1], _NETNS_ETC / self.netns(i) / "hosts"
        return ["nsenter", f"--net=/run/netns/{self.netns(i)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "--", "sh", "-c",
                f'mount --bind "{hosts}" /etc/hosts && hostname "{host}" && exec "$0" "$@"', *cmd]  # fmt: skip

    def remove(self) -> list[str]:
        """Delete what ``up`` made, by name, newest first; return what could not be removed."""
        left = []
        for item in reversed(self.made):
            kind, name = item.split(":", 1)
            if kind == "etc":
                shutil.rmtree(_NETNS_ETC / name, ignore_errors=True)
                ok = not (_NETNS_ETC / name).exists()
            elif kind == "netns":
                res = _ip("netns", "del", name, check=False)
                ok = res.returncode == 0 or "No such file" in res.stderr
            else:  # deleting one end of a veth pair deletes both
                res = _ip("link", "del", name, check=False)
                ok = res.returncode == 0 or "Cannot find device" in res.stderr
            if not ok:
                left.append(item)
        self.made = left
        return left

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> NodeNet | None:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None
