"""``trd-hpc bench faults``: SIGKILL a training run at random moments and check
that every resume ends where an uninterrupted run ends.

One uninterrupted reference run, then a loop: start (or resume) the same run,
kill its whole process group after a delay drawn from a seeded RNG (printed,
so a failure can be replayed), resume with ``--resume auto``, until the run
finishes; when it finishes before the kills are used up, a fresh run directory
takes the remaining kills.  Each finished run is compared with the reference:
final weights with ``torch.equal`` (BatchNorm buffers included), every
deterministic field of ``metrics.jsonl`` and ``metrics.json``.

Reported: kills survived / kills tried, and the wall time the kills cost
(all attempts' wall time over the uninterrupted runs' wall time).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trd_hpc.rundir import RunDir

# Fields that measure time or speed: they differ between any two runs.
TIMING_KEYS = ("seconds", "train.samples_per_s", "train.mfu", "train_seconds")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def compare_runs(ref: Path, run: Path, weights_file: str = "model.pt") -> list[str]:
    """What differs between two finished run directories (empty: the same run)."""
    ref, run = Path(ref), Path(run)
    out: list[str] = []
    for name in (weights_file, "metrics.jsonl", "metrics.json"):
        if not (run / name).exists():
            out.append(f"{run / name} is missing")
    if out:
        return out
    a = torch.load(ref / weights_file, map_location="cpu", weights_only=True)
    b = torch.load(run / weights_file, map_location="cpu", weights_only=True)
    if a.keys() != b.keys():
        out.append(f"weights: keys differ ({sorted(set(a) ^ set(b))[:5]})")
    for k in sorted(set(a) & set(b)):
        if not torch.equal(a[k], b[k]):
            d = (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else "shape"
            out.append(f"weights: {k} differs (max |diff| {d})")
    ha, hb = RunDir(ref).history(), RunDir(run).history()
    if len(ha) != len(hb):
        out.append(f"metrics.jsonl: {len(ha)} epochs vs {len(hb)}")
    for i, (ra, rb) in enumerate(zip(ha, hb), 1):
        ra, rb = _deterministic(ra), _deterministic(rb)
        for k in sorted(set(ra) | set(rb)):
            if not _same(ra.get(k), rb.get(k)):
                out.append(f"metrics.jsonl epoch {i}: {k} = {ra.get(k)!r} vs {rb.get(k)!r}")
    ma = _deterministic(json.loads((ref / "metrics.json").read_text()))
    mb = _deterministic(json.loads((run / "metrics.json").read_text()))
    for k in sorted(set(ma) | set(mb)):
        if not _same(ma.get(k), mb.get(k)):
            out.append(f"metrics.json: {k} = {ma.get(k)!r} vs {mb.get(k)!r}")
    return out


def train_command(
    config: str, out: Path, cohort: Path, overrides: list[str], nproc: int, resume: bool = False, evaluate: bool = False
) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = base + [
        "-m",
        "trd_hpc.cli",
        "train",
        config,
        "--out",
        str(out),
        "--quiet",
        f"data.cohort={cohort}",
        *overrides,
    ]
    if not evaluate:
        cmd.append("--no-eval")
    if resume:
        cmd += ["--resume", "auto"]
    return cmd


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRD_FAULT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def _attempt(cmd: list[str], kill_after: float | None, log: Path) -> tuple[bool, float, int]:
    """(killed, wall seconds, exit code) of one start or resume."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        p = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=kill_after)
            return False, time.perf_counter() - t0, p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank, as a lost node
            p.wait()
            return True, time.perf_counter() - t0, p.returncode


def measure(
    config: str | None = None,
    overrides=(),
    kills: int = 20,
    seed: int = 0,
    nproc: int = 1,
    scratch_dir: str | None = None,
    json_path: str | None = None,
) -> int:
    from trd_hpc.config import load_config
    from trd_hpc.data.generate import generate

    config = config or "emt_tiny"
    overrides = list(overrides or [])
    if not any(o.startswith("train.checkpoint_every_steps=") for o in overrides):
        overrides.append("train.checkpoint_every_steps=2")
    if nproc > 1 and not any(o.startswith("train.strategy=") for o in overrides):
        overrides.append("train.strategy=ddp")
    overrides.append("train.num_threads=1")
    cfg = load_config(config, overrides)
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-faults-"))
    cohort = scratch / "cohort"
    if not (cohort / "manifest.json").exists():
        print(f"bench faults: making the cohort of {config} in {cohort} ...", flush=True)
        generate(cfg.cohort, cohort, progress=False)
    log = scratch / "runs.log"
    ref = scratch / "ref"
    print(f"bench faults: reference run -> {ref}", flush=True)
    killed, t_ref, rc = _attempt(train_command(config, ref, cohort, overrides, nproc), None, log)
    if rc != 0:
        print(f"error: the reference run failed (exit {rc}); see {log}", file=sys.stderr)
        return 1
    rng = random.Random(seed)
    tried = survived = runs = 0
    wall = 0.0
    schedule: list[dict] = []
    failures: list[str] = []
    while tried < kills:
        runs += 1
        out = scratch / f"run-{runs}"
        pending = 0  # kills on this run whose resume has not been checked yet
        resume = False
        while True:
            delay = rng.uniform(0.0, t_ref) if tried < kills else None
            was_killed, dt, rc = _attempt(
                train_command(config, out, cohort, overrides, nproc, resume=resume), delay, log
            )
            wall += dt
            if was_killed:
                tried += 1
                pending += 1
                schedule.append({"run": runs, "kill": tried, "after_s": round(delay, 3)})
                print(f"  kill {tried}/{kills}: run-{runs} SIGKILLed after {delay:.2f} s", flush=True)
                resume = True
                continue
            if rc != 0:
                failures.append(f"run-{runs}: exit {rc} after a resume; see {log}")
                break
            diffs = compare_runs(ref, out)
            if diffs:
                failures.append(f"run-{runs}: differs from the reference: " + "; ".join(diffs[:5]))
            else:
                survived += pending
            if delay is not None and pending == 0:
                schedule.append({"run": runs, "kill": None, "after_s": round(delay, 3), "note": "finished first"})
            break
    extra = wall - runs * t_ref
    res = {
        "config": config,
        "nproc": nproc,
        "seed": seed,
        "kills_tried": tried,
        "kills_survived": survived,
        "runs": runs,
        "reference_s": t_ref,
        "wall_s": wall,
        "extra_s": extra,
        "extra_per_kill_s": extra / tried if tried else 0.0,
        "schedule": schedule,
        "failures": failures,
    }
    print(
        f"\nkills survived / tried: {survived}/{tried} ({runs} run(s), all compared with the reference: "
        f"weights bit for bit, metrics.jsonl and metrics.json less timings)"
    )
    print(
        f"wall: {wall:.1f} s for {runs} run(s) vs {runs * t_ref:.1f} s uninterrupted "
        f"= {wall / (runs * t_ref):.2f}x; {res['extra_per_kill_s']:.1f} s extra per kill"
    )
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    if json_path:
        from trd_hpc.fsio import atomic_write_json

        atomic_write_json(json_path, res)
    return 1 if failures or survived != tried else 0
