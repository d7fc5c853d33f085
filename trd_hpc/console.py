"""Console lines prefixed with what is being trained or evaluated.

A run trains its model, then its baselines, then evaluates; their lines look alike ("epoch 1",
"no checkpoint yet: starting from scratch"), so each carries a label: ``[emt] epoch 1 ...``,
``[baseline late_fusion_mlp] epoch 1 ...``, ``[eval] calibration ...``. ``labelled(name)``
sets the label for everything said inside it (nested: the innermost wins); ``say`` prints a
line with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

_label: contextvars.ContextVar[str] = contextvars.ContextVar("trd_console_label", default="")


def label() -> str:
    return _label.get()


def prefix() -> str:
    """``"[label] "``, or nothing outside ``labelled``."""
    lab = _label.get()
    return f"[{lab}] " if lab else ""


def say(msg: str) -> None:
    print(prefix() + msg, flush=True)


@contextlib.contextmanager
def labelled(name: str):
    token = _label.set(name)
    try:
        yield
    finally:
        _label.reset(token)


@contextlib.contextmanager
def step(what: str):
    """``[label] what ...`` now and ``[label] what: N.N s`` when done (evaluation steps)."""
    say(f"{what} ...")
    t0 = time.perf_counter()
    yield
    say(f"{what}: {time.perf_counter() - t0:.1f} s")
