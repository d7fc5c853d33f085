"""``trd-hpc bench gpu``: one command that measures a training device and writes one JSON.

For the EMT and the dual-path 3-D CNN (the papers' shapes on a GPU, the tiny configs on a CPU,
which is what CI runs so the command cannot rot): the trainer's samples/s and peak memory in
bf16 autocast, fp16 autocast with GradScaler and fp32; the trainer fed by its HDF5 loader
against batches already on the device (the data stall); MFU against a matmul measured in this
run at the model's own GEMM shapes and square (bf16 on a GPU, fp32 on a CPU); an exact-resume
check (killed at a fault point, resumed, weights compared with an uninterrupted run); then
DeepSpeed ZeRO-1 and ZeRO-2 in this one process (world size 1). See gpu_train.py and
gpu_resume.py for how each figure is taken.

Every stage prints a progress line when it starts and ends and records ``status`` ok, skipped
(with its ``reason``: what this device cannot run) or failed (with its ``error``, the full
traceback); the JSON is rewritten after each stage, so a job killed at its time limit keeps what
it measured. Any failed stage makes the command exit 1.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from trd_hpc.bench.gpu_resume import RESUME_RTOL, ResumeMismatch, resume_stage
from trd_hpc.bench.gpu_train import (
    ModelBench,
    Skipped,
    cpu_name,
    data_stall_stage,
    deepspeed_info,
    deepspeed_stage,
    mfu_stage,
    precision_stage,
)
from trd_hpc.errors import ConfigError
from trd_hpc.fsio import atomic_write_json
from trd_hpc.train import distributed as D

# What each mode measures: the config of each model, the optimiser steps of one pass (the
# cohort's training split is that many batches), timed passes after one warm-up, DeepSpeed's
# models, warm-up and timed steps, cohort-writing processes. A GPU pass at the papers' shapes
# should last about a second, so a GPU run is mostly writing the EMT cohort (~3.6 GB) and the
# resume runs' start-ups. On a CPU each DeepSpeed step allocates a buffer of its default reduce
# bucket (5e8 elements: 0.5-1 s a step here, with no caching allocator to reuse it), so one model
# shows that the path works.
PLANS = {
    "cuda": {
        "configs": {"emt": "emt", "cnn3d": "cnn3d"},
        "steps": 24,
        "passes": 5,
        "deepspeed_models": ["emt", "cnn3d"],
        "deepspeed_warmup": 2,
        "deepspeed_steps": 10,
        "workers": 4,
    },
    "cpu": {
        "configs": {"emt": "emt_tiny", "cnn3d": "cnn3d_tiny"},
        "steps": 4,  # the fewest the resume check takes (killed after step 3)
        "passes": 3,
        "deepspeed_models": ["emt"],
        "deepspeed_warmup": 1,
        "deepspeed_steps": 2,
        "workers": 1,
    },
}
PRECISIONS = ("bf16", "fp16", "fp32")
UNITS = {
    "*_samples_per_s, samples_per_s": "training samples per second",
    "*_bytes": "bytes",
    "*flops_per_s, peak_flops": "FLOP per second",
    "flops_per_sample": "FLOP per training sample (forward + backward)",
    "mfu": "fraction of the measured matmul peak (0..1)",
    "hdf5_over_resident": "ratio (1 = the loader costs nothing)",
    "max_abs_diff": "weight units",
    "max_rel_diff, rtol": "fraction of the tensor's max |weight|",
    "seconds, wall_s": "seconds",
}


def pick_device(kind: str) -> torch.device:
    """``auto``: CUDA when a device is visible; ``cuda`` without one is a one-line error."""
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"bench gpu --device: auto, cpu or cuda, not {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "bench gpu --device cuda: no CUDA device is visible to PyTorch "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu or auto"
        )
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return D.pick_device("cuda", 0)


def environment(device: torch.device) -> dict:
    env = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            device_memory_bytes=p.total_memory,
            compute_capability=f"{p.major}.{p.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
            # fp32 convolutions use TF32 tensor cores unless turned off; fp32 matmuls do not
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    return env


def _clean(x):
    """JSON without NaN/inf (json.dumps would write tokens other parsers refuse)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Run:
    """The JSON being filled in, written after every stage."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.t0 = path, time.perf_counter()
        env = environment(device)
        self.res: dict = {
            "benchmark": "gpu",
            "mode": device.type,
            "device": env["device_name"],
            "complete": False,
            "environment": env,
            "units": UNITS,
            "plan": PLANS[device.type],
            "models": {},
            "deepspeed": {},
            "failed_stages": [],
        }

    def write(self) -> None:
        self.res["wall_s"] = time.perf_counter() - self.t0
        atomic_write_json(self.path, _clean(self.res))

    def stage(self, label: str, fn) -> dict:
        """``fn()``'s figures with their status (ok, skipped, failed), recorded and written."""
        print(f"bench gpu: [{label}] ...", flush=True)
        t0 = time.perf_counter()
        try:
            out = {"status": "ok", **fn()}
        except Skipped as e:
            out = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # kept with its traceback: on a GPU node the JSON is all there is
            out = {"status": "failed", "error": traceback.format_exc()}
            if isinstance(e, ResumeMismatch):
                out.update(e.figures)
            self.res["failed_stages"].append(label)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, so the next stage can run
        out["seconds"] = time.perf_counter() - t0
        line = out.get("reason") or (out["error"].strip().splitlines()[-1] if "error" in out else "")
        print(f"bench gpu: [{label}] {out['status']} in {out['seconds']:.1f} s {line}".rstrip(), flush=True)
        self.write()
        return out


def _model(run: Run, name: str, config: str, device: torch.device, scratch: Path, plan: dict) -> ModelBench | None:
    r = run.res["models"][name] = {"config": config}
    box: list[ModelBench] = []
    r["cohort"] = run.stage(f"{name} cohort", lambda: _cohort(name, config, device, scratch, plan, box))
    if not box:
        return None
    mb = box[0]
    r["precisions"], meter = {}, []
    for p in PRECISIONS:
        r["precisions"][p] = run.stage(f"{name} {p}", lambda p=p: precision_stage(mb, p, plan["passes"], meter))
    r["data_stall"] = run.stage(f"{name} HDF5 vs device-resident", lambda: data_stall_stage(mb, plan["passes"]))
    r["mfu"] = run.stage(f"{name} MFU", lambda: mfu_stage(r["precisions"], meter[0] if meter else None))
    r["resume"] = run.stage(f"{name} exact resume", lambda: resume_stage(mb))
    return mb


def _cohort(name: str, config: str, device: torch.device, scratch: Path, plan: dict, box: list) -> dict:
    mb = ModelBench(name, config, plan["steps"], device, scratch, plan["workers"])
    box.append(mb)  # the caller's, for the later stages
    return {
        "subjects": mb.cfg.cohort.n_subjects,
        "batch_size": mb.batch_size,
        "steps_per_epoch": mb.epoch_steps,
        "dir": str(mb.root),
    }


def _deepspeed(run: Run, benches: dict, device: torch.device, plan: dict) -> None:
    if not benches:
        return  # no cohort to train on: each model's failure is recorded already
    box: list[D.DistInfo] = []

    def group() -> dict:
        box.append(deepspeed_info(device))
        return {"backend": box[0].backend, "world_size": box[0].world_size}

    run.res["deepspeed"]["process_group"] = run.stage("DeepSpeed process group", group)
    if not box:
        return
    info = box[0]
    try:
        for name in (n for n in plan["deepspeed_models"] if n in benches):
            mb = benches[name]
            for stage in (1, 2):
                run.res["deepspeed"][f"{name}_zero{stage}"] = run.stage(
                    f"{name} DeepSpeed ZeRO-{stage}",
                    lambda mb=mb, stage=stage: deepspeed_stage(
                        mb, info, stage, plan["deepspeed_warmup"], plan["deepspeed_steps"]
                    ),
                )
    finally:
        D.shutdown(info)


def _fmt_mem(r: dict) -> str:
    if r.get("peak_memory_bytes") is not None:
        return f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"
    return f"process peak RSS {r.get('process_peak_rss_bytes', 0) / 2**20:.0f} MiB"


def _summary(res: dict, json_path: Path) -> None:
    env = res["environment"]
    print(f"\nbench gpu ({res['mode']}: {env['device_name']}; torch {env['torch']}, CUDA {env['cuda']})")
    for name, r in res["models"].items():
        c = r.get("cohort", {})
        print(f"  {name} ({r['config']}, batch {c.get('batch_size', '?')}):")
        mfu = r.get("mfu", {}).get("mfu", {})
        for p, x in r.get("precisions", {}).items():
            if x["status"] != "ok":
                print(f"    {p:5s} {x['status']}: {x.get('reason') or x['error'].strip().splitlines()[-1]}")
                continue
            m = mfu.get(p)
            shown = f"MFU {100 * m:.1f} %" if m is not None else "MFU n/a"
            print(f"    {p:5s} {x['samples_per_s']:9.1f} samples/s  {_fmt_mem(x)}  {shown}")
        ds = r.get("data_stall", {})
        if ds.get("status") == "ok":
            print(
                f"    HDF5 loader {ds['hdf5_samples_per_s']:.1f} samples/s vs device-resident "
                f"{ds['resident_samples_per_s']:.1f} = {ds['hdf5_over_resident']:.2f}x ({ds['precision']})"
            )
        rs = r.get("resume", {})
        if "passed" in rs:
            verdict = "bit-identical" if rs["bit_identical"] else f"max rel diff {rs['max_rel_diff']:.2g}"
            print(f"    resume after a kill: {'ok' if rs['passed'] else 'FAILED'}, {verdict}; needs {rs['criterion']}")
    for key, x in res["deepspeed"].items():
        if key == "process_group":
            if x["status"] != "ok":
                print(f"  DeepSpeed: {x['status']}: {x.get('reason') or x.get('error', '').strip().splitlines()[-1]}")
            continue
        if x["status"] == "ok":
            print(f"  DeepSpeed {key}: {x['samples_per_s']:.1f} samples/s ({x['precision']}, {x['backend']})")
        else:
            print(f"  DeepSpeed {key}: {x['status']}")
    if res["failed_stages"]:
        print(f"  FAILED stages (tracebacks in the JSON): {', '.join(res['failed_stages'])}")
    print(f"figures: {json_path} ({res['wall_s']:.0f} s)")


def measure(device: str = "auto", json_path: str | None = None, scratch_dir: str | None = None) -> int:
    dev = pick_device(device)
    path = Path(json_path or "bench_gpu.json").resolve()
    plan = PLANS[dev.type]
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-gpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    run = Run(path, dev)
    run.res["resume_rtol"] = None if dev.type == "cpu" else RESUME_RTOL
    print(f"bench gpu: {dev.type} mode on {run.res['device']}; figures -> {path}", flush=True)
    run.write()
    try:
        benches = {}
        for name, config in plan["configs"].items():
            mb = _model(run, name, config, dev, scratch, plan)
            if mb is not None:
                benches[name] = mb
        _deepspeed(run, benches, dev, plan)
    finally:
        if not scratch_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    run.res["complete"] = True
    run.write()
    _summary(run.res, path)
    return 1 if run.res["failed_stages"] else 0
