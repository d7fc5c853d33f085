"""Atomic file writes and the clean-up of their temporary files.

Every file a reader may open while a writer runs (or after it was killed) is
written as ``.NAME.tmp-HOST-PID-rRAND``, flushed to disk and renamed over ``NAME``:
a reader sees the old file or the new one, never half of one.  A failed write
(full disk, read-only directory) removes its temporary file and raises
:class:`WriteError` naming the file; the old file stays as it was.  Temporary
files of killed writers are removed by :func:`remove_stale_temps`, which
leaves alone those whose writer is still alive.

The temporary file is created by this module (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random
part in its name) before the caller writes it: a name planted in advance, or a symbolic
link there pointing elsewhere, makes the write fail instead of following it.
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
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[^/]+)-(?P<pid>\d+)(-r[0-9a-z_]{8})?$")
# the pattern of a temporary name's tail, for layouts that list what a directory may hold
TEMP_TAIL = r"\.tmp-.+-[0-9]+(-r[0-9a-z_]{8})?"


def temp_name(path: Path) -> Path:
    """A fresh, unpredictable temporary name beside ``path`` (host and pid kept for clean-up)."""
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-r{os.urandom(4).hex()}")


def create_exclusive(path: Path) -> None:
    """Create the empty file ``path``; fails if anything (a file, a symbolic link) is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    os.close(fd)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_filename(text: str, max_len: int = 100) -> str:
    """``text`` (a participant id, a name from a table) as one file name inside a folder.

    The one door through which data becomes a file name: characters other than letters,
    digits, ``.``, ``_`` and ``-`` become ``_``, leading dots are dropped (no ``..``, no
    hidden files), and a name that had to change gets 8 hex digits of its sha256 appended,
    so two ids that map to the same text still get two files."""
    import hashlib

    text = str(text)
    clean = _UNSAFE.sub("_", text).lstrip(".")[:max_len]
    if clean == text and clean:
        return clean
    return f"{clean or 'id'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(v: str) -> str:
    """A text cell a spreadsheet will not run: one starting with = + - @ (a formula to Excel,
    LibreOffice, Sheets) gets a leading apostrophe (OWASP's advice for CSV injection)."""
    return "'" + v if v.startswith(_FORMULA_START) else v


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
        create_exclusive(tmp)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {explain(e)}") from e
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


def remove_stale_temps(directory: str | Path, recursive: bool = False, name_prefix: str | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-HOST-PID[-rRAND]`` files left by dead writers on this host.

    A temp of a live process, or of another host (its pid means nothing
    here), is left alone; with ``name_prefix`` only temps of NAMEs starting with it
    (a folder shared with other files: only this output's).  Returns the removed paths."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in d.rglob(".*.tmp-*") if recursive else d.glob(".*.tmp-*"):
        m = _TEMP.match(p.name)
        if not m or m.group("host") != HOST or pid_alive(int(m.group("pid"))):
            continue
        if name_prefix is not None and not m.group("name").startswith(name_prefix):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed
