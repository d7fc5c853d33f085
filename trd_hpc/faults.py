"""Deterministic fault injection: die at a named point, to test exact resume.

``TRD_FAULT=POINT[:ARG...]`` makes the process kill itself the moment it
reaches that point, e.g.::

    TRD_FAULT=after-step:17               after optimiser step 17 (1-based, global)
    TRD_FAULT=mid-step:17                 in step 17, after backward, before the optimiser step
    TRD_FAULT=checkpoint-write:3          3rd checkpoint: written to its temp name, not yet renamed
    TRD_FAULT=checkpoint-rename:3         3rd checkpoint: renamed, before old ones are pruned
    TRD_FAULT=epoch-end:2:before-bn       end of epoch 2 (1-based): before precise-BN,
                       :before-val        before validation, :before-save  before its checkpoint
    TRD_FAULT=prune:1                     while pruning old checkpoints (1st time)
    TRD_FAULT=evaluate | report           at the start of the evaluation stage / the report
    TRD_FAULT=shard-subject:K:J           generate: writing subject J (0-based) of shard K
    TRD_FAULT=shard-write:K               generate: K-th shard of this process complete, not renamed
    TRD_FAULT=tune-result:K               a sweep's driver, at the K-th trial result it received

Several points may be given, comma-separated; the first reached fires.
``TRD_FAULT_KILL=self`` (default) sends SIGKILL to this process,
``group`` to its whole process group (a launcher and all its ranks, as a lost
node does), ``exit`` calls ``os._exit(137)`` (no clean-up, no flush).
Two modes do not kill: ``usr2`` sends SIGUSR2 to this process (a pre-emption
notice, honoured at the next step boundary) and goes on; ``pause`` prints
``TRD_FAULT: paused at ...`` and waits for any signal (so a test can deliver
one, e.g. ``scancel --signal=USR2``, at a known point), then goes on.
``TRD_FAULT_RANK`` (default 0) is the rank that fires; ``all`` for every rank.

Unset, each point costs one dict lookup.  Points that take a count
(``checkpoint-write``, ``checkpoint-rename``, ``prune``) count the times this
process reached them; the others compare their argument (step, epoch).
"""

from __future__ import annotations

import os
import signal
import sys

COUNTED = {
    "checkpoint-write",
    "checkpoint-rename",
    "prune",
    "metrics-write",
    "metrics-rename",
    "model-write",
    "model-rename",
    "shard-write",
    "shard-rename",
    "tune-result",
}
POINTS = (
    "after-step",
    "mid-step",
    "checkpoint-write",
    "checkpoint-rename",
    "epoch-end",
    "prune",
    "evaluate",
    "report",
    "metrics-write",
    "metrics-rename",
    "model-write",
    "model-rename",
    "shard-subject",
    "shard-write",
    "shard-rename",
    "tune-result",
)


def _parse(spec: str | None) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, *args = item.split(":")
        if name not in POINTS:
            raise SystemExit(f"TRD_FAULT: unknown point {name!r}; known: {', '.join(POINTS)}")
        out.setdefault(name, []).append(tuple(args))
    return out


_armed = _parse(os.environ.get("TRD_FAULT"))
_counts: dict[str, int] = {}
_rank = "0"


def set_rank(rank: int) -> None:
    """Called once the process knows its rank (only that rank fires)."""
    global _rank
    _rank = str(rank)


def rearm(spec: str | None) -> None:
    """Arm from a spec string (tests in one process; the environment is read at import)."""
    global _armed
    _armed = _parse(spec)
    _counts.clear()


def _die(where: str) -> None:
    how = os.environ.get("TRD_FAULT_KILL", "self")
    if how == "usr2":
        sys.stderr.write(f"TRD_FAULT: SIGUSR2 at {where}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGUSR2)
        return
    if how == "pause":
        sys.stderr.write(f"TRD_FAULT: paused at {where}\n")
        sys.stderr.flush()
        signal.pause()  # returns once a handled signal arrived
        return
    sys.stderr.write(f"TRD_FAULT: dying at {where}\n")
    sys.stderr.flush()
    if how == "exit":
        os._exit(137)
    if how == "group":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, *args) -> None:
    """A named fault point.  ``args`` identify the occasion (step, epoch, phase)."""
    wanted = _armed.get(name)
    if not wanted:
        return
    target = os.environ.get("TRD_FAULT_RANK", "0")
    if target != "all" and target != _rank:
        return
    if name in COUNTED:
        _counts[name] = _counts.get(name, 0) + 1
        args = (_counts[name],)
    have = tuple(str(a) for a in args)
    for w in wanted:
        if not w or have[: len(w)] == w:
            _die(":".join((name, *have)))
            return
