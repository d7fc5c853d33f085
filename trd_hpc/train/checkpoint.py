"""Checkpoint files: atomic writes, newest-valid lookup, RNG state capture.

Layout under ``RUN_DIR/checkpoints/``:
* ``step-000000123.pt`` for the single/DDP strategies (one file written by rank 0);
* ``step-000000123/`` for DeepSpeed (the engine's own per-rank files) plus a
  ``complete`` marker written after every rank has saved.
A file is written under a temporary name and renamed, so a crash mid-write
never leaves a checkpoint that looks valid; a checkpoint that does not load is
skipped in favour of the previous one.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from trd_hpc import faults
from trd_hpc.errors import TrainingError
from trd_hpc.fsio import atomic_write_with, remove_stale_temps

# v2: the run identity (config keys, cohort checksum) and the epoch's records so far.
FORMAT = "trd-hpc-checkpoint-v2"
_STEP = re.compile(r"^step-(\d{9})(\.pt)?$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int, deepspeed: bool = False) -> str:
    return f"step-{step:09d}" + ("" if deepspeed else ".pt")


def save_atomic(obj, path: Path) -> None:
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp), fault="checkpoint")


def remove_stale(run_dir: Path) -> list[Path]:
    """Temp files of checkpoint writes that were killed (their writer is dead)."""
    return remove_stale_temps(checkpoint_dir(run_dir)) + remove_stale_temps(run_dir)


def records_to_tensors(rec: dict) -> dict:
    """Per-subject records as tensors (a checkpoint loads with weights_only=True)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rec.items()}


def records_from_tensors(rec: dict) -> dict:
    return {k: v.numpy() for k, v in rec.items()}


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, newest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP.match(p.name)
        if not m:
            continue
        if p.is_dir() and not (p / "complete").exists():
            continue
        out.append((int(m.group(1)), p))
    return sorted(out, key=lambda t: t[0], reverse=True)


def load_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, a pickle that is not plain tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            # torch's own text goes on to suggest weights_only=False, i.e. running the file's code
            first = "it holds objects other than tensors and plain data, which are never unpickled"
        raise TrainingError(f"{path}: not a readable trd-hpc checkpoint ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainingError(f"{path}: not a {FORMAT} checkpoint (format {fmt!r})")
    return state


def newest_valid(run_dir: Path, fresh: bool = False) -> tuple[Path, dict | None] | None:
    """The newest checkpoint that loads: (path, state) for files, (dir, None) for
    DeepSpeed directories (the engine loads those itself); None when the run has none.

    An unreadable newest checkpoint falls back to the previous one (each skipped file is
    warned about once a readable one is found).  When there are checkpoints and not one
    loads, that is an error, not a fresh start: silently retraining from step 0 would
    throw away what the user thinks is kept.  ``fresh`` (``--resume fresh``) asks for
    exactly that, and returns None."""
    found = list_checkpoints(run_dir)
    bad: list[str] = []
    for _, p in found:
        if p.is_dir():
            state = None
        else:
            try:
                state = load_file(p)
            except TrainingError as e:  # corrupt or truncated: fall back to the previous one
                bad.append(str(e))
                continue
        for why in bad:
            warnings.warn(f"skipping unreadable checkpoint: {why}", stacklevel=2)
        return p, state
    if bad and not fresh:
        raise TrainingError(
            f"{checkpoint_dir(run_dir)}: none of its {len(bad)} checkpoint(s) is readable (newest: {bad[0]}); "
            f"nothing was changed. Rerun with --resume fresh to start this run again from step 0"
        )
    return None


def prune(run_dir: Path, keep: int = 2) -> None:
    old = list_checkpoints(run_dir)[keep:]
    for i, (_, p) in enumerate(old):
        if p.is_dir():
            # The marker goes first, so a half-deleted directory is never taken for a checkpoint.
            (p / "complete").unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if i == 0:
            faults.point("prune")


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(s):
    # torch.save turns the tuple of ints into a tuple; random.setstate needs (int, tuple, float|None).
    version, internal, gauss = s
    return int(version), tuple(int(x) for x in internal), gauss
