"""What a paper's reproduction is made of: its stages (``trd-hpc`` commands), the table rows
read from the run's files (``Sources`` remembers file, key and value behind each figure) and
the helpers the papers' recipes share.  Each paper's recipe is ``trd_hpc/tasks/NAME/reproduce.py``;
``trd_hpc.reproduce`` runs one, and ``trd_hpc.study`` a study's runs, both through ``run_stages``."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trd_hpc import resources
from trd_hpc.errors import TrdError
from trd_hpc.fsio import atomic_write_json
from trd_hpc.rundir import read_json


class ReproduceError(TrdError):
    """A stage failed, or DIR holds another paper's or scale's reproduction."""


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]  # after `trd-hpc`
    outputs: tuple[str, ...]  # files (relative to DIR) a finished stage has written

    def done(self, out: Path) -> bool:
        return all((out / p).exists() for p in self.outputs)

    def command(self) -> str:
        return shlex.join(("trd-hpc", *self.args))


class Sources:
    """Values read from the run's JSON files, each remembered with where it came from."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._files: dict[str, dict] = {}
        self.used: list[dict] = []

    def has(self, file: str, key: str) -> bool:
        return key in self._load(file)

    def keys(self, file: str, prefix: str) -> list[str]:
        return [k for k in self._load(file) if k.startswith(prefix)]

    def get(self, file: str, key: str, *index: int):
        data = self._load(file)
        if key not in data:
            raise ReproduceError(f"{self.out / file}: no key '{key}' (was the stage that writes it finished?)")
        v = data[key]
        for i in index:
            v = v[i]
        self.used.append({"file": file, "key": key, "index": list(index), "value": v})
        return v

    def _load(self, file: str) -> dict:
        if file not in self._files:
            self._files[file] = read_json(self.out / file, "metrics file")
        return self._files[file]


@dataclass(frozen=True)
class Row:
    label: str
    paper: str
    ours: Callable[[Sources], str]


@dataclass(frozen=True)
class Recipe:
    paper: str
    title: str
    stages: tuple[Stage, ...]
    header: Callable[[Sources], str]  # first column's heading, e.g. "test set (225 volumes)"
    rows: tuple[Row, ...]
    reductions: tuple[str, ...] = field(default=())


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{digits}f}"


def epochs_cell(src: Sources, file: str) -> str:
    run, best = src.get(file, "epochs_run"), src.get(file, "best_epoch")
    if src.get(file, "stopped_early"):
        return f"early stop at epoch {run}, best epoch {best}"
    return f"{run} epochs (the limit), best epoch {best}"


def cv_cell(src: Sources, key: str, digits: int) -> str:
    f = "cv/cv_summary.json"
    mean, sd = src.get(f, f"mean.{key}"), src.get(f, f"sd.{key}")
    lo, hi = src.get(f, f"min.{key}"), src.get(f, f"max.{key}")
    return f"{fmt(mean, digits)} +- {fmt(sd, digits)} ({fmt(lo, digits)}..{fmt(hi, digits)})"


def config_ref(config: str, scale: str) -> str:
    """The paper's packaged config: ``configs/NAME.yaml`` when the working directory is a checkout
    showing that very file (the commands in reproduction.md then read as the README's), else
    its packaged name, which every command takes."""
    name = config + ("_tiny" if scale == "tiny" else "")
    local = Path("configs") / f"{name}.yaml"
    if local.is_file() and local.resolve() == resources.config_path(name).resolve():
        return str(local)
    return name


def generate_and_train(cfg: str, data: str, main: str, overrides: list[str]) -> tuple[Stage, Stage]:
    """The first two stages of both papers: the cohort, then the main model (evaluated later,
    with its baselines, by the evaluate stage)."""
    return (
        Stage("generate", ("generate", cfg, "--out", data, "--workers", "2"), ("data/manifest.json",)),
        Stage(
            "train",
            ("train", cfg, "--out", main, "--resume", "auto", "--no-eval", f"data.cohort={data}", *overrides),
            ("main/metrics.json", "main/model.pt"),
        ),
    )


# ---------------------------------------------------------------------------------- the runner
def run_stages(
    stages, out: Path, state: dict, state_path: Path, progress: bool = True, again: str = "trd-hpc reproduce", say=print
) -> dict:
    """Run each stage not finished before (its record in ``state`` and its outputs both there),
    each as its own ``trd-hpc`` process, recording each in ``state_path`` as it starts and ends;
    ``again`` is the command whose rerun continues (named in the errors)."""
    state.setdefault("stages", {})
    for i, stage in enumerate(stages, 1):
        rec = state["stages"].get(stage.name)
        where = f"stage {i}/{len(stages)} {stage.name}"
        if rec and rec.get("finished") and rec.get("command") == stage.command() and stage.done(out):
            say(f"{where}: finished before ({rec['seconds']:.0f} s), skipped")
            continue
        say(f"{where}: {stage.command()}")
        # Marked as running before it starts: a stage found still "running" on the next call
        # was killed without saving its time, and the table says so instead of under-counting.
        interrupted = (rec or {}).get("interrupted", 0) + int(bool(rec and rec.get("running")))
        entry = {"command": stage.command(), "finished": False, "interrupted": interrupted}
        prior = (rec or {}).get("seconds_before", 0.0)
        state["stages"][stage.name] = {**entry, "running": True, "seconds_before": prior}
        atomic_write_json(state_path, state)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "trd_hpc.cli", *stage.args]
        log = out / "logs" / f"{stage.name}.log"
        if progress:
            rc = subprocess.run(cmd).returncode
        else:  # --quiet: each stage's output goes to DIR/logs/STAGE.log
            log.parent.mkdir(exist_ok=True)
            with open(log, "ab") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - t0 + prior
        if rc != 0 or not stage.done(out):
            # failed, or pre-empted (SIGUSR2/SIGTERM saved a checkpoint and exited 0): its time is
            # known and counted when a later call finishes the stage
            state["stages"][stage.name] = {**entry, "seconds_before": seconds}
            atomic_write_json(state_path, state)
        if rc != 0:
            if not progress:
                sys.stderr.write(_tail(log))
            raise ReproduceError(
                f"{where} failed (exit {rc}): {stage.command()}"
                + ("" if progress else f" (its output: {log})")
                + f"; fix the cause and rerun the same `{again}` to continue from this stage"
            )
        if not stage.done(out):
            raise ReproduceError(
                f"{where} stopped before writing {', '.join(stage.outputs)}; rerun the same `{again}` to continue"
            )
        state["stages"][stage.name] = {**entry, "finished": True, "seconds": seconds}
        atomic_write_json(state_path, state)
        say(f"{where}: done in {seconds:.0f} s")
    return state


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    return "".join(f"  {ln}\n" for ln in text)
