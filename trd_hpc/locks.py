"""Advisory directory locks: one writer per run or cohort directory.

``DirLock(dir)`` holds an ``fcntl`` lock on ``dir/.trd-hpc.lock`` and writes
the holder (host, pid, command) into it.  A second process is refused with a
message naming the holder, or waits (``wait=True``).  The kernel drops the
lock when its holder dies, so a lock left by a killed process is taken over
at once; the file itself stays and is simply reused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from trd_hpc.errors import LockedError, WriteError

LOCK_FILE = ".trd-hpc.lock"
# Locks this process holds, by path: taking one again (train -> evaluate) nests.
_held: dict[str, int] = {}


class DirLock:
    def __init__(
        self,
        directory: str | Path,
        what: str = "directory",
        wait: bool = False,
        poll_s: float = 0.5,
        shared: bool = False,
        name: str = LOCK_FILE,
    ):
        """``shared``: many holders at once (e.g. SLURM array tasks writing one shard each),
        none while an exclusive holder has it."""
        self.dir = Path(directory)
        self.path = self.dir / name
        self.what, self.wait, self.poll_s, self.shared = what, wait, poll_s, shared
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
            return f"pid {h['pid']} on {h['host']} ({h.get('cmd', '?')}, since {h.get('since', '?')})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def acquire(self) -> "DirLock":
        key = os.path.realpath(self.path)
        if _held.get(key):
            _held[key] += 1
            self._nested = key
            return self
        self._nested = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a lock file planted as a symbolic link would have its target truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            from trd_hpc.fsio import explain

            if e.errno == errno.ELOOP:
                raise WriteError(f"{self.path}: the lock file is a symbolic link; refused (remove it)") from None
            raise WriteError(f"cannot create the lock file {self.path}: {explain(e)}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WriteError(f"{self.path}: the lock file is not a regular file; refused (remove it)")
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait:
                    who = self.holder()
                    os.close(fd)
                    raise LockedError(
                        f"{self.dir}: this {self.what} is in use by {who}; wait for it to finish "
                        f"or use another directory"
                    ) from None
                time.sleep(self.poll_s)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cmd": " ".join(sys.argv[:3]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _held[key] = 1
        self._key = key
        return self

    def release(self) -> None:
        if getattr(self, "_nested", None):
            _held[self._nested] -= 1
            self._nested = None
            return
        if self._fd is not None:
            _held.pop(self._key, None)
            try:
                if not self.shared:
                    os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
