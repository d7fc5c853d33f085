"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak of a GPU is its datasheet dense rate for the training dtype (a short table; unknown
GPUs are measured).  A CPU has no datasheet figure that means much here, so its peak is the
rate of a large matmul measured in this process, with the same threads: never read from a
file written at another moment, since a shared machine's rate changes with its load (a cached
figure from a busy moment once made an idle run report 176 %).  ``matmul_flops`` also times
the GEMMs of a model's own shapes (``bench train``).
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) datasheet peaks, FLOP/s.
_GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "V100": {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12},
}

_MEASURED: dict[tuple, float] = {}  # this process's measurements: (device, dtype, threads) -> FLOP/s


def matmul_flops(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seconds: float = 0.25,
    shapes: list[tuple[int, int, int]] | None = None,
) -> float:
    """FLOP/s of ``a @ b`` now: square (1024 on a CPU, 8192 on a GPU), or the (m, k, n) GEMMs of
    ``shapes`` taken in turn (their FLOPs over their time), best of the repeats in ``seconds``."""
    if shapes is None:
        n = 1024 if device.type == "cpu" else 8192
        shapes = [(n, n, n)]
    # A private generator: drawing from the global RNG here would shift every later dropout
    # mask, so a run that measures would train differently from one that does not.
    g = torch.Generator(device=device).manual_seed(0)
    pairs = [
        (
            torch.randn(m, k, device=device, dtype=dtype, generator=g),
            torch.randn(k, n, device=device, dtype=dtype, generator=g),
        )
        for m, k, n in shapes
    ]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def once() -> float:
        t = time.perf_counter()
        for a, b in pairs:
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    once()  # warm-up
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < seconds or best == float("inf"):
        best = min(best, once())
    return flops / best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from): a GPU's datasheet, else a matmul measured in
    this process (once; ``remeasure`` takes a later, higher rate)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks.get(precision, peaks["fp32"]), f"{key} datasheet {precision}"
    key = (str(device), precision, torch.get_num_threads())
    if key not in _MEASURED:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        _MEASURED[key] = matmul_flops(device, dtype if device.type == "cuda" else torch.float32)
    return _MEASURED[key], "matmul measured in this process"


def remeasure(device: torch.device, precision: str) -> float:
    """Measure the CPU peak again and keep the higher figure (a rate measured while the machine
    was busier than during training would put MFU above 100 %)."""
    peak, _ = peak_flops(device, precision)
    if device.type == "cuda":
        return peak
    key = (str(device), precision, torch.get_num_threads())
    _MEASURED[key] = max(peak, matmul_flops(device))
    return _MEASURED[key]
