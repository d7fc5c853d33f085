"""Atomic file writes and the clean-up of their temporary files.

Every file a reader may open while a writer runs (or after it was killed) is
written as ``.NAME.tmp-HOST-PID``, flushed to disk and renamed over ``NAME``:
a reader sees the old file or the new one, never half of one.  A failed write
(full disk, read-only directory) removes its temporary file and raises
:class:`WriteError` naming the file; the old file stays as it was.  Temporary
files of killed writers are removed by :func:`remove_stale_temps`, which
leaves alone those whose writer is still alive.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Callable, Iterator

from trd_hpc import faults
from trd_hpc.errors import WriteError

HOST = socket.gethostname()
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[^/]+)-(?P<pid>\d+)$")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def explain(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only directory or file system?)"
    return e.strerror or str(e)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, fault: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``.

    ``fault`` names the fault points fired between the write and the rename
    (``NAME-write``) and after the rename (``NAME-rename``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create {path.parent}: {explain(e)}") from e
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if fault:
            faults.point(f"{fault}-write")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {explain(e)}; the previous file (if any) is unchanged") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    if fault:
        faults.point(f"{fault}-rename")


def atomic_write_bytes(path: str | Path, data: bytes, fault: str | None = None) -> None:
    with atomic_path(path, fault) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, fault: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fault)


def _json_default(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1, fault: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n", fault)


def _disk_full(d: Path) -> bool:
    try:
        st = os.statvfs(d)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def atomic_write_with(path: str | Path, write: Callable[[Path], None], fault: str | None = None) -> None:
    """``write(tmp)`` fills the temporary file (torch.save, np.savez, h5py, ...)."""
    with atomic_path(path, fault) as tmp:
        try:
            write(tmp)
        except RuntimeError as e:
            # torch.save reports a failed write as RuntimeError ("iostream error"), not OSError
            if _disk_full(Path(path).parent):
                raise OSError(errno.ENOSPC, "No space left on device") from e
            raise


def remove_stale_temps(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Remove ``.NAME.tmp-HOST-PID`` files left by dead writers on this host.

    A temp of a live process, or of another host (its pid means nothing
    here), is left alone.  Returns the removed paths."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in d.rglob(".*.tmp-*") if recursive else d.glob(".*.tmp-*"):
        m = _TEMP.match(p.name)
        if not m or m.group("host") != HOST or pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed
