"""Pre-emption signals: the handler only records the signal.

SLURM (``--signal=USR2@T``), submitit (USR2) and schedulers that terminate
(TERM) all end up here.  The trainer looks at the flag at the next step
boundary, agrees with the other ranks, writes a checkpoint and exits cleanly:
saving inside a signal handler could interrupt a half-written step.
"""

from __future__ import annotations

import signal

_received: list[str] = []
_installed = False


def _handler(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    """Install once, as early as possible (before slow imports and start-up)."""
    global _installed
    if _installed:
        return
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        try:
            signal.signal(sig, _handler)
        except ValueError:  # not the main thread (e.g. inside some launchers)
            return
    _installed = True


def requested() -> str | None:
    return _received[0] if _received else None


def clear() -> None:
    _received.clear()
