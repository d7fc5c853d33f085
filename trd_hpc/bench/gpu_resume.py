"""``trd-hpc bench gpu``'s exact-resume check on the device.

Three ``trd-hpc train`` processes on the bench cohort, one epoch, a checkpoint every 2 steps:
an uninterrupted reference; a run that SIGKILLs itself after step 3 (``TRD_FAULT``, see
trd_hpc/faults.py), started beside the reference; the killed run resumed (``--resume auto``,
from its step-2 checkpoint, so step 3 is trained again). Their final weights are compared:

* on a CPU they must be bit for bit the same (the trainer's CPU runs are bit-reproducible);
* on a GPU within ``RESUME_RTOL``: every tensor's max |ref - resumed| at most 1e-5 of the
  tensor's max |ref|. The trainer asks for deterministic algorithms (``train.deterministic``),
  but only warns where an op has none (some cuDNN/cuBLAS backward kernels accumulate in a
  scheduling-dependent order), so the last bits may differ; integer buffers must be equal.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch

from trd_hpc.bench.faults import train_command
from trd_hpc.config import derive, to_yaml
from trd_hpc.train.strategy import resolve_precision

RESUME_RTOL = 1e-5
KILL_AFTER_STEP = 3
CHECKPOINT_EVERY = 2
# The one-process group of the DeepSpeed stage sets these; a child must not join it.
_GROUP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(fault: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _GROUP_VARS and k != "TRD_FAULT"}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if fault:
        env.update(TRD_FAULT=fault, TRD_FAULT_KILL="self")
    return env


def _start(cmd: list[str], fault: str | None, log: Path) -> tuple[subprocess.Popen, object]:
    fh = log.open("w")
    return subprocess.Popen(cmd, env=_env(fault), stdout=fh, stderr=subprocess.STDOUT), fh


def _finish(p: subprocess.Popen, fh, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise RuntimeError(f"{' '.join(p.args[:6])} ...: no exit within {timeout:.0f} s") from None
    finally:
        fh.close()


def _tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:]


def compare_weights(ref: Path, run: Path) -> dict:
    """Bit identity and the largest absolute and relative differences of two ``model.pt``."""
    a = torch.load(ref, map_location="cpu", weights_only=True)
    b = torch.load(run, map_location="cpu", weights_only=True)
    out = {"tensors": len(a), "keys_match": a.keys() == b.keys(), "differing_tensors": 0}
    max_abs = max_rel = 0.0
    exact_buffers = True
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            out["keys_match"] = False
            continue
        if torch.equal(x, y):
            continue
        out["differing_tensors"] += 1
        if not x.is_floating_point():
            exact_buffers = False
            continue
        d = (x.double() - y.double()).abs().max().item()
        scale = x.double().abs().max().item()
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / scale if scale > 0 else float("inf"))
    out.update(
        bit_identical=out["keys_match"] and out["differing_tensors"] == 0,
        integer_buffers_equal=exact_buffers,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
    )
    return out


def resume_stage(mb, timeout: float = 300.0) -> dict:
    """Kill a run of ``mb``'s model after step 3, resume it, compare with an uninterrupted run."""
    cpu = mb.device.type == "cpu"
    updates = {"train.max_epochs": 1, "train.checkpoint_every_steps": CHECKPOINT_EVERY}
    if cpu:
        updates["train.num_threads"] = 1  # two runs side by side on the same cores
    cfg = derive(mb.cfg, updates, f"bench gpu {mb.name} resume")
    steps = mb.epoch_steps
    if steps <= KILL_AFTER_STEP:
        raise RuntimeError(f"{steps} steps an epoch: too few to kill after step {KILL_AFTER_STEP} and resume")
    yaml_path = mb.scratch / f"resume-{mb.name}.yaml"
    yaml_path.write_text(to_yaml(cfg))
    ref, run = mb.scratch / f"resume-{mb.name}-ref", mb.scratch / f"resume-{mb.name}-killed"
    logs = {k: mb.scratch / f"resume-{mb.name}-{k}.log" for k in ("ref", "killed", "resumed")}
    fault = f"after-step:{KILL_AFTER_STEP}"
    # The reference and the run to kill are independent: started together, they share the wait.
    p_ref, f_ref = _start(train_command(str(yaml_path), ref, mb.root, [], 1), None, logs["ref"])
    p_kill, f_kill = _start(train_command(str(yaml_path), run, mb.root, [], 1), fault, logs["killed"])
    rc_kill = _finish(p_kill, f_kill, timeout)
    rc_ref = _finish(p_ref, f_ref, timeout)
    if rc_ref != 0:
        raise RuntimeError(f"the reference run failed (exit {rc_ref}):\n{_tail(logs['ref'])}")
    if rc_kill != -signal.SIGKILL:
        raise RuntimeError(f"the run to kill exited {rc_kill}, not by SIGKILL at {fault}:\n{_tail(logs['killed'])}")
    p_res, f_res = _start(train_command(str(yaml_path), run, mb.root, [], 1, resume=True), None, logs["resumed"])
    rc_res = _finish(p_res, f_res, timeout)
    resumed_log = logs["resumed"].read_text(errors="replace")
    if rc_res != 0 or "resumed from" not in resumed_log:
        raise RuntimeError(f"the resumed run failed (exit {rc_res}) or did not resume:\n{resumed_log[-2000:]}")
    cmp = compare_weights(ref / "model.pt", run / "model.pt")
    if cpu:
        criterion = "bit-identical (CPU)"
        passed = cmp["bit_identical"]
    else:
        criterion = f"every tensor's max |ref - resumed| <= {RESUME_RTOL:g} x its max |ref|; integer buffers equal"
        passed = cmp["keys_match"] and cmp["integer_buffers_equal"] and cmp["max_rel_diff"] <= RESUME_RTOL
    out = {
        "killed_at": fault,
        "checkpoint_every_steps": CHECKPOINT_EVERY,
        "steps": steps,
        "precision": resolve_precision(cfg.train.precision, mb.device),
        "deterministic": cfg.train.deterministic,
        "criterion": criterion,
        "rtol": None if cpu else RESUME_RTOL,
        "passed": passed,
        **cmp,
    }
    if not passed:
        raise ResumeMismatch(out)
    return out


class ResumeMismatch(Exception):
    """The resumed weights differ beyond the criterion: a failed stage that keeps its figures."""

    def __init__(self, figures: dict):
        super().__init__(
            f"resumed weights differ from the uninterrupted run's: {figures['differing_tensors']} tensor(s), max "
            f"abs diff {figures['max_abs_diff']:.3g}, max rel diff {figures['max_rel_diff']:.3g} "
            f"(criterion: {figures['criterion']})"
        )
        self.figures = figures
