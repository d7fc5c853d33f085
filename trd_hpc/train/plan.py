"""The launch policy, in one place, for the sbatch scripts (through ``trd-hpc train``/``cv``
under srun), ``trd-hpc submit`` and the trainer:

* several tasks and a config that says ``train.strategy: single`` -> DDP;
* torch threads per process = the CPUs SLURM gave the task, else this process's share of the
  CPUs it may run on;
* the rendezvous of srun tasks: the job's first host and a port derived from the job id, so
  every task computes the same address without talking.

Requeue after a pre-emption is the launcher's own (``slurm/_train.sh`` runs ``scontrol requeue``
from the batch shell; submitit requeues through its own handler); both resume with
``--resume auto`` from the checkpoint the trainer wrote.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping


def slurm_port(job_id: str) -> int:
    """A port in 15000..29999 from the job id (same on every task of the job)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 15000 + int(digits) % 15000


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # scontrol unavailable: "node[01-04],gpu7" -> "node01"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.split("-")[0].split(",")[0].rstrip("]")
    return head


def env_from_slurm(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch.distributed variables derived from SLURM's, for a task launched by srun."""
    e = os.environ if environ is None else environ
    if "SLURM_PROCID" not in e or "SLURM_NTASKS" not in e:
        return {}
    nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or socket.gethostname()
    return {
        "RANK": e["SLURM_PROCID"],
        "WORLD_SIZE": e["SLURM_NTASKS"],
        "LOCAL_RANK": e.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": e.get("SLURM_NTASKS_PER_NODE", e.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        .split("(")[0]
        .split(",")[0],
        "MASTER_ADDR": e.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": e.get("MASTER_PORT") or str(slurm_port(e.get("SLURM_JOB_ID", "0"))),
    }


def slurm_tasks(environ: Mapping[str, str] | None = None) -> tuple[int, int | None]:
    """(tasks, CPUs per task) of the srun step this process is a task of; (1, None) outside SLURM."""
    e = os.environ if environ is None else environ
    cpus = int(e["SLURM_CPUS_PER_TASK"]) if e.get("SLURM_CPUS_PER_TASK", "").isdigit() else None
    if "SLURM_PROCID" not in e or not e.get("SLURM_NTASKS", "").isdigit():
        return 1, cpus
    return int(e["SLURM_NTASKS"]), cpus


def implied_overrides(
    overrides: list[str], tasks: int, cpus_per_task: int | None, configured_strategy: str
) -> list[str]:
    """The user's overrides plus what the resources imply: train.strategy=ddp for several tasks
    when neither the overrides nor the config chose a multi-process strategy, and
    train.num_threads = the CPUs per task unless set."""
    ov = list(overrides or [])
    keys = {o.split("=", 1)[0].strip() for o in ov}
    if tasks > 1 and "train.strategy" not in keys and configured_strategy == "single":
        ov.append("train.strategy=ddp")
    if cpus_per_task and "train.num_threads" not in keys:
        ov.append(f"train.num_threads={cpus_per_task}")
    return ov


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a SLURM step's or taskset's), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threads_per_process(local_world_size: int, environ: Mapping[str, str] | None = None) -> int:
    """CPUs this process may use: SLURM's allocation, else its affinity mask, shared by the local ranks."""
    e = os.environ if environ is None else environ
    if e.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(e["SLURM_CPUS_PER_TASK"]))
    return max(1, available_cpus() // max(local_world_size, 1))
