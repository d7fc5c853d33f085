"""Process-group set-up for torchrun, SLURM (srun) and plain single-process runs.

Rank, world size, local rank and the rendezvous come from torchrun's variables
when present, else from SLURM's (one task per process under ``srun``; see
``trd_hpc.train.plan`` for the rendezvous).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trd_hpc.errors import ConfigError
from trd_hpc.train.plan import env_from_slurm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(strategy: str, device_kind: str = "auto", timeout_s: int = 1800, standalone: bool = False) -> DistInfo:
    """Join (or create) the process group that ``strategy`` needs.

    ``standalone``: one process on its own whatever the launcher's variables say
    (rank 0 training the baselines after a multi-process run)."""
    if standalone:
        if strategy != "single":
            raise ConfigError(f"a standalone run is one process: train.strategy=single, not {strategy}")
        return DistInfo(0, 1, 0, 1, pick_device(device_kind, int(os.environ.get("LOCAL_RANK", 0))))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(env_from_slurm())
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if strategy == "single" and world > 1:
        raise ConfigError(
            f"train.strategy=single but {world} processes were launched; use train.strategy=ddp or deepspeed"
        )
    device = pick_device(device_kind, local_rank)
    info = DistInfo(rank, world, local_rank, local_world, device)
    if strategy == "single":
        return info
    if world == 1:  # a one-process group, so DDP and DeepSpeed code paths still run
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if rank == 0 and world > 1:
            print(
                f"process group: {backend}, {world} ranks, rendezvous "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
                flush=True,
            )
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    info.backend = backend
    return info


def shutdown(info: DistInfo, synchronize: bool = False) -> None:
    """Destroy the process group; with ``synchronize`` (a clean exit, every rank here) after
    a barrier, so no rank closes its connections while another is still in a collective."""
    if info.distributed and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj, src: int = 0):
    """The main rank's value of ``obj`` on every rank (one decision, taken once)."""
    if not info.distributed:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_DONE_KEY = "trd-hpc/main-done"


def release_others(info: DistInfo) -> None:
    """Let the ranks waiting in :func:`wait_for_main` go on (rank 0, when its own work is done)."""
    if info.distributed:
        dist.distributed_c10d._get_default_store().set(_DONE_KEY, "1")


def wait_for_main(info: DistInfo, timeout_s: float = 7 * 24 * 3600) -> None:
    """Wait, without a collective's timeout, until rank 0 calls :func:`release_others`
    (its evaluation may take longer than the process group's timeout).  Raises if rank 0
    dies meanwhile (its store goes away)."""
    if info.distributed:
        dist.distributed_c10d._get_default_store().wait([_DONE_KEY], timedelta(seconds=timeout_s))


def any_flag(info: DistInfo, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if not info.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
