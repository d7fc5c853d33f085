"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak of a GPU is its datasheet dense rate for the training dtype (a short
table; unknown GPUs are measured).  A CPU has no datasheet figure that means
much here, so its peak is the measured rate of a large matmul with the same
threads, cached per CPU model and thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# Dense (no sparsity) datasheet peaks, FLOP/s.
_GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "V100": {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12},
}


def _cache_file(key: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trd-hpc"
    return base / f"peak-{key}.json"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    n = 1024 if device.type == "cpu" else 8192
    # A private generator: drawing from the global RNG here would shift every
    # later dropout mask, so a run that measured (no cache yet) would train
    # differently from one that read the cache, and an exact resume would break.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks.get(precision, peaks["fp32"]), f"{key} datasheet {precision}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    key = f"{device.type}-{platform.processor() or platform.machine()}-{torch.get_num_threads()}t-{precision}"
    if device.type == "cuda":
        key = f"cuda-{torch.cuda.get_device_name(device).replace(' ', '_')}-{precision}"
    path = _cache_file(key.replace("/", "_"))
    try:
        return float(json.loads(path.read_text())["flops"]), f"measured matmul ({path.name})"
    except (OSError, ValueError, KeyError):
        pass
    flops = measure_matmul_flops(device, dtype if device.type == "cuda" else torch.float32)
    try:  # atomic: another rank may read the cache while this one writes it
        from trd_hpc.fsio import atomic_write_json

        atomic_write_json(path, {"flops": flops})
    except OSError:
        pass
    return flops, "measured matmul"
