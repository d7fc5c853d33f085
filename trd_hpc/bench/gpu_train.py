"""``trd-hpc bench gpu``'s training figures for one model: samples/s and peak memory per
precision, the HDF5 loader against batches already on the device, MFU, DeepSpeed ZeRO.

Every figure comes from the trainer's own ``train_epoch`` (its autocast, GradScaler, strategy,
finiteness checks and per-subject records), so they are what a training run gets. A *pass* is
one ``train_epoch`` over either the trainer's loader (the cohort's HDF5 shards, page cache warm
after the warm-up pass) or ``Resident``: one batch read from the cohort once, its inputs moved to
the device, and handed to the trainer as every step's batch, as many steps as the loader has. The
two differ only in where the batch comes from, so their ratio is the data stall.
"""

from __future__ import annotations

import gc
import math
import resource
import time
from pathlib import Path

import torch

from trd_hpc.bench.train import PeakMeter, _cohort_subjects, linear_shapes
from trd_hpc.config import derive, load_config
from trd_hpc.data.generate import generate
from trd_hpc.tasks import make_task
from trd_hpc.train import distributed as D
from trd_hpc.train.trainer import Trainer


class Skipped(Exception):
    """A stage this device cannot run (recorded with its reason, not a failure)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Resident:
    """The same device-resident batch for each of ``steps`` steps (the trainer's loader's role)."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


class Memory:
    """Peak device memory over the passes it is told about: CUDA's allocator peak, or on a CPU
    the process's peak RSS (which only grows: no per-stage figure exists)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> None:
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))

    def figures(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_bytes": self.peak, "peak_memory_source": "torch.cuda.max_memory_allocated"}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "peak_memory_bytes": None,
            "peak_memory_reason": "CPU: no allocator peak per stage; the process peak RSS so far is given instead",
            "process_peak_rss_bytes": rss,
        }


class ModelBench:
    """One model's cohort (generated in ``scratch``) and the trainers built on it."""

    def __init__(self, name: str, config: str, steps: int, device: torch.device, scratch: Path, workers: int):
        self.name, self.config, self.device = name, config, device
        cfg = load_config(config)
        n = _cohort_subjects(cfg, steps * cfg.train.batch_size)
        self.root = scratch / f"cohort-{name}"
        self.cfg = derive(
            cfg,
            {
                "cohort.n_subjects": n,
                "cohort.subjects_per_shard": max(n // 4, 1),
                "data.cohort": str(self.root),
                "train.strategy": "single",
                "train.device": device.type,
                "train.num_threads": torch.get_num_threads(),
                "tracking.wandb": False,
            },
            f"bench gpu {name}",
        )
        self.scratch, self.runs = scratch, 0
        gb = n * _subject_bytes(self.cfg) / 1e9
        print(f"bench gpu:   making a {cfg.task} cohort of {n} subjects ({gb:.2f} GB) in {self.root} ...", flush=True)
        generate(self.cfg.cohort, self.root, workers=workers, progress=False)
        self.batch_size = self.cfg.train.batch_size
        from trd_hpc.data.dataset import CohortDataset

        ds = CohortDataset(self.root, self.cfg.data.split("train"), complete=self.cfg.data.complete("train"))
        self.epoch_steps = math.ceil(len(ds) / self.batch_size)  # the trainer's loader's batches
        ds.close()
        self.flops_per_sample: int | None = None
        self.shapes: list | None = None

    def trainer(self, updates: dict | None = None, info: D.DistInfo | None = None) -> Trainer:
        cfg = derive(self.cfg, updates or {}, f"bench gpu {self.name}") if updates else self.cfg
        self.runs += 1
        info = info or D.DistInfo(device=self.device)
        t = Trainer(cfg, make_task(cfg, str(self.root)), self.scratch / f"run-{self.name}-{self.runs}", info, self.root)
        t.progress = False
        self.flops_per_sample = int(t.flops_per_sample)
        return t

    def resident(self, trainer: Trainer) -> Resident:
        """One training batch, its model inputs on the device; as many steps as the loader has."""
        ds = trainer.datasets["train"]
        b = ds.__getitems__(list(range(min(self.batch_size, len(ds)))))
        names = set(trainer.task.input_names)
        batch = {k: (v.to(self.device) if k in names else v.clone()) for k, v in b.items()}
        if self.shapes is None:  # the model's own GEMMs, for the matmul yardstick
            self.shapes = linear_shapes(trainer.raw_model, trainer.task.inputs(batch, self.device, torch.float32))
        return Resident(batch, len(trainer.loaders["train"]))

    def timed(self, trainer: Trainer, loader) -> float:
        """samples/s of one ``train_epoch`` fed by ``loader``."""
        trainer.loaders["train"] = loader
        sync(self.device)
        t0 = time.perf_counter()
        trainer.train_epoch(trainer.train_sampler.epoch + 1)
        sync(self.device)
        dt = time.perf_counter() - t0
        return trainer.train_sampler.start / dt  # the samples this epoch consumed


def _subject_bytes(cfg) -> int:
    from trd_hpc.data.generate import subject_nbytes

    return subject_nbytes(cfg.cohort)


def release(trainer: Trainer | None, device: torch.device) -> None:
    """Free a trainer's model, optimiser and open shards before the next one is measured."""
    if trainer is None:
        return
    for ds in trainer.datasets.values():
        ds.close()
    engine = getattr(trainer.strategy, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_precision(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` is only run briefly on ``device`` (None: measured in full); Skipped
    when the device cannot run it."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise Skipped(f"{torch.cuda.get_device_name(device)} has no bf16 support")
    if device.type == "cpu" and precision != "fp32":
        return (
            f"CPU: {precision} autocast run briefly ({BRIEF_STEPS} steps, one timed pass) to exercise the path "
            "(GradScaler too for fp16); not a yardstick, most CPUs have no bf16/fp16 matmul units"
        )
    return None


BRIEF_STEPS = 2


def precision_stage(mb: ModelBench, precision: str, passes: int, meter_box: list) -> dict:
    """samples/s (best of ``passes`` after a warm-up) and peak memory at ``precision``."""
    note = check_precision(precision, mb.device)
    trainer = None
    try:
        trainer = mb.trainer({"train.precision": precision})
        loader = mb.resident(trainer)
        if note:
            loader, passes = Resident(loader.batch, min(BRIEF_STEPS, len(loader))), 1
        if not meter_box:
            meter_box.append(PeakMeter(mb.device, mb.shapes, yardstick_dtype(mb.device)))
        mem = Memory(mb.device)
        mem.reset()
        mb.timed(trainer, loader)  # warm-up: allocator, kernels, the optimiser's state
        mem.read()
        rates = []
        for i in range(passes):
            if not note and i in (0, passes - 1):
                # The yardstick, outside the memory window (its matrices are large), before and
                # after the timed passes, so a busy moment cannot lower the best of them.
                meter_box[0]()
            mem.reset()
            rates.append(mb.timed(trainer, loader))
            mem.read()
        sps = max(rates)
        out = {
            "precision": trainer.precision,
            "autocast_dtype": str(trainer.autocast_dtype).replace("torch.", "") if trainer.autocast_dtype else None,
            "grad_scaler": trainer.strategy.scaler is not None,
            # train.deterministic (the default) turns cuDNN's autotuner off: a GPU's figures are with it
            "deterministic": trainer.tc.deterministic,
            "batch_size": mb.batch_size,
            "steps_per_pass": len(loader),
            "timed_passes": passes,
            "samples_per_s": sps,
            "samples_per_s_passes": rates,
            "flops_per_sample": mb.flops_per_sample,
            "achieved_flops_per_s": mb.flops_per_sample * sps,
            "staged_batch_bytes": sum(v.numel() * v.element_size() for v in loader.batch.values()),
            **mem.figures(),
        }
        if note:
            out["note"] = note
        return out
    finally:
        release(trainer, mb.device)


def data_stall_stage(mb: ModelBench, passes: int) -> dict:
    """The trainer fed by its HDF5 loader against the same trainer fed device-resident batches,
    alternating pass by pass (a busy moment hurts both), at the default precision."""
    trainer = None
    try:
        trainer = mb.trainer()
        hdf5 = trainer.loaders["train"]
        resident = mb.resident(trainer)
        mb.timed(trainer, hdf5)  # warm-up: the page cache, the loader's buffers
        mb.timed(trainer, resident)
        rates: dict[str, list[float]] = {"hdf5": [], "resident": []}
        for _ in range(passes):
            rates["hdf5"].append(mb.timed(trainer, hdf5))
            rates["resident"].append(mb.timed(trainer, resident))
        h, r = max(rates["hdf5"]), max(rates["resident"])
        d = trainer.cfg.data
        return {
            "precision": trainer.precision,
            "method": "the trainer's train_epoch fed by its own HDF5 loader vs by one batch kept on the device, "
            "same steps, alternating passes, fastest of each",
            "loader": f"{d.num_workers} {d.worker_type} worker(s)" if d.num_workers else "in-process reads",
            "steps_per_pass": len(resident),
            "hdf5_samples_per_s": h,
            "resident_samples_per_s": r,
            "hdf5_over_resident": h / r,
            "samples_per_s_passes": rates,
        }
    finally:
        release(trainer, mb.device)


def yardstick_dtype(device: torch.device) -> torch.dtype:
    """The matmul MFU divides by: bf16 on a GPU (fp16 where it has none), fp32 on a CPU, whose
    bf16 matmuls are emulated on most CPUs and would flatter every figure."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def mfu_stage(precisions: dict, meter: PeakMeter | None) -> dict:
    """Achieved FLOP/s of each measured precision over the best matmul rate of this run; a figure
    above 100 % is measured again once, then reported as null with its reason."""
    if meter is None or not meter.square:
        raise Skipped("no precision was measured, so there is no achieved FLOP/s to compare")
    measured = {p: r for p, r in precisions.items() if r.get("status") == "ok"}

    def ratios(peak: float) -> dict:
        return {p: r["achieved_flops_per_s"] / peak for p, r in measured.items()}

    peak = meter.figures()["peak_flops"]
    mfu = ratios(peak)
    remeasured = False
    if any(v > 1 for v in mfu.values()):
        meter()  # the machine may have been busier while the yardstick ran
        peak, remeasured = meter.figures()["peak_flops"], True
        mfu = ratios(peak)
    out = {
        "yardstick_dtype": str(meter.dtype).replace("torch.", ""),
        **meter.figures(),
        "remeasured": remeasured,
        "mfu": {p: (v if v <= 1 else None) for p, v in mfu.items()},
    }
    above = [p for p, v in mfu.items() if v > 1]
    if above:
        out["mfu_reason"] = f"{', '.join(above)}: above the measured matmul peak even after measuring it again"
    return out


def deepspeed_info(device: torch.device) -> D.DistInfo:
    """A one-process group for DeepSpeed (gloo on a CPU, nccl on a GPU); Skipped without DeepSpeed."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise Skipped(f"DeepSpeed is not installed ({e}); pip install 'trd-hpc[deepspeed]'") from None
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress
    return D.init("deepspeed", device.type)


def deepspeed_stage(mb: ModelBench, info: D.DistInfo, stage: int, warmup: int, steps: int) -> dict:
    """A few steps of ZeRO-``stage`` in this process (world size 1): samples/s, peak memory."""
    # A CPU trains in fp32 (DeepSpeed's bf16 engine would cast the model to bf16, which most CPUs
    # emulate), as the tests run DeepSpeed; a GPU in the JSON's bf16.
    updates = {
        "train.strategy": "deepspeed",
        "train.deepspeed_config": f"zero{stage}_bf16.json",
        "train.precision": "auto" if mb.device.type == "cuda" else "fp32",
    }
    trainer = None
    try:
        trainer = mb.trainer(updates, info)
        batch = mb.resident(trainer).batch
        mem = Memory(mb.device)
        mem.reset()
        mb.timed(trainer, Resident(batch, warmup))  # the engine's buffers and first steps
        mem.reset()
        sps = mb.timed(trainer, Resident(batch, steps))
        mem.read()
        return {
            "zero_stage": trainer.zero_stage,
            "precision": trainer.precision,
            "backend": info.backend,
            "world_size": info.world_size,
            "batch_size": mb.batch_size,
            "warmup_steps": warmup,
            "steps": steps,
            "samples_per_s": sps,
            **mem.figures(),
        }
    finally:
        release(trainer, mb.device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"
