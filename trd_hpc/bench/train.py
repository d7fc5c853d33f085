"""``trd-hpc bench train``: the trainer's samples/s against a bare PyTorch loop and Lightning.

Same model, same initial weights, same batch size, same subjects, same optimiser and gradient
clipping, fp32, measured in one run:
* bare: the batches preloaded as tensors in memory, then inputs, forward, loss, backward,
  clipping (when the config clips), optimiser step, zero_grad, nothing else; with the trainer's
  optimiser (``build_optimizer``: fused Adam/AdamW), so ours/bare is the trainer's overhead;
* ours: ``Trainer.train_epoch`` over the same subjects read from the cohort (page cache warm),
  with its sampler, loader, finiteness and signal checks, per-subject records and progress
  accounting;
* Lightning: ``lightning.Trainer.fit`` over the bare loop's in-memory batches (progress bar,
  logger, checkpointing and model summary off; ``gradient_clip_val`` as configured), when the
  ``bench`` extra is installed, with the optimiser as Lightning's docs write it
  (``torch.optim.AdamW(params, lr=..., weight_decay=...)``, PyTorch's default implementation):
  ours/Lightning compares with what users would pick instead;
* compiled: the bare loop with ``torch.compile(model)`` (the compilation is timed apart).
The bare loop and ours alternate epoch by epoch, so a busy moment hurts both; each figure is the
fastest of ``epochs`` timed epochs after a warm-up epoch. Targets: ours/bare >= 0.95 and
ours/Lightning >= 1.0.

MFU: the model's FLOPs per sample times samples/s, over a peak measured in this run, after the
warm-up and after each round of timed epochs (the best of those measurements, so a busy moment
cannot lower it): a square fp32 matmul, and the GEMMs of the model's own ``nn.Linear`` shapes
at this batch size (their rate is printed too: how fast the model's own products can run).
An MFU above 100 % is impossible by construction and the benchmark's test asserts it.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from trd_hpc.config import derive, load_config
from trd_hpc.data.generate import generate
from trd_hpc.fsio import atomic_write_json
from trd_hpc.tasks import make_task
from trd_hpc.train import distributed as D
from trd_hpc.train.perf import peak_flops
from trd_hpc.train.strategy import build_optimizer
from trd_hpc.train.trainer import Trainer


def _bare_epoch(model, task, batches, opt, device, clip: float | None) -> float:
    model.train()
    t0 = time.perf_counter()
    for b in batches:
        out = model(**task.inputs(b, device, torch.float32))
        loss, _ = task.loss(out, b, device)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _lightning_epochs(model, task, batches, make_opt, device, clip: float | None, epochs: int) -> list[float]:
    """Seconds of each of ``1 + epochs`` epochs of Lightning's Trainer (the first one warms up)."""
    import logging

    import lightning as L

    # its "GPU available: False" / "`Trainer.fit` stopped" lines would interleave the report
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, b, i):
            out = self.model(**task.inputs(b, device, torch.float32))
            return task.loss(out, b, device)[0]

        def configure_optimizers(self):
            return make_opt(self.model.parameters())

    seconds: list[float] = []

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            seconds.append(time.perf_counter() - self.t0)

    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)  # batches as they are
    # "the dataloader does not have many workers" (in memory, on purpose), "srun is available but
    # not used" (a benchmark, not a SLURM job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="cpu" if device.type == "cpu" else "gpu",
            devices=1,
            max_epochs=1 + epochs,
            precision="32-true",
            gradient_clip_val=clip,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[EpochTimer()],
        )
        trainer.fit(Module(), loader)
    return seconds


def _cohort_subjects(cfg, n_train: int) -> int:
    """Subjects of a cohort whose train split holds ``n_train`` of them (an even number)."""
    n = int(
        round(
            n_train / cfg.cohort.split.train
            if hasattr(cfg.cohort.split, "train")
            else n_train / ((1 - cfg.cohort.split.test) * (1 - cfg.cohort.split.val))
        )
    )
    n += n % 2
    return n


def _set_up(cfg, scratch: Path, threads: int, n_train: int):
    """Generate the bench cohort in ``scratch`` and a Trainer on it: ``(cfg, root, info, trainer)``."""
    # A cohort whose train split is exactly `steps` full batches.
    n = _cohort_subjects(cfg, n_train)
    root = scratch / "cohort"
    cfg = derive(
        cfg,
        {
            "cohort.n_subjects": n,
            "cohort.subjects_per_shard": max(n // 4, 1),
            "data.cohort": str(root),
            "train.strategy": "single",
            "train.num_threads": threads,
        },
        "bench train",
    )
    print(f"bench train: making a {cfg.task} cohort of {n} subjects in {root} ...", flush=True)
    generate(cfg.cohort, root, workers=1, progress=False)
    info = D.DistInfo()
    trainer = Trainer(cfg, make_task(cfg, str(root)), scratch / "run", info, root, progress=False)
    return cfg, root, info, trainer


def _preload(ds, batch_size: int) -> list[dict]:
    """The same subjects, preloaded as batches, for the bare loop."""
    ids = list(range(len(ds)))
    batches = []
    for lo in range(0, len(ids), batch_size):
        b = ds.__getitems__(ids[lo : lo + batch_size])
        batches.append({k: v.clone() for k, v in b.items()})
    return batches


def _compiled_loop(fresh_model, make_opt, task, batches, device, clip: float | None):
    """The bare loop under ``torch.compile``: ``(figures, loop)``, ``loop`` None when compiling failed."""
    c_model = fresh_model()
    c_opt = make_opt(c_model.parameters())
    try:
        c_fn = torch.compile(c_model)
        t0 = time.perf_counter()
        _bare_epoch(c_fn, task, batches[:1], c_opt, device, clip)  # compiles forward and backward
        compiled = {"compile": "measured", "compile_seconds": time.perf_counter() - t0}
        return compiled, lambda: _bare_epoch(c_fn, task, batches, c_opt, device, clip)
    except Exception as exc:  # no C++ compiler, an unsupported op: reported, not fatal
        return {"compile": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}, None


def _time_loops(loops: dict, epochs: int, peaks=None) -> dict[str, list[float]]:
    # Warm-up each (allocator, first touch, one-time kernels), then alternate timed epochs;
    # ``peaks()`` (the matmul rates) after the warm-up and after each round.
    for fn in loops.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(epochs):
        if peaks is not None:
            peaks()
        for k, fn in loops.items():
            times[k].append(fn())
    if peaks is not None:
        peaks()
    return times


def linear_shapes(model, batch_inputs: dict) -> list[tuple[int, int, int]]:
    """The (rows, in, out) GEMM of every ``nn.Linear`` call in one forward pass."""
    shapes: list[tuple[int, int, int]] = []

    def hook(mod, args, _out):
        x = args[0]
        shapes.append((x.numel() // mod.in_features, mod.in_features, mod.out_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(**batch_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


class PeakMeter:
    """The matmul rates measured during the benchmark: square, and the model's Linear shapes,
    in ``dtype`` (fp32 here; ``bench gpu`` measures a GPU in bf16, its training dtype)."""

    def __init__(self, device, shapes: list[tuple[int, int, int]], dtype: torch.dtype = torch.float32):
        self.device, self.shapes, self.dtype = device, shapes, dtype
        self.square: list[float] = []
        self.model: list[float] = []

    def __call__(self) -> None:
        from trd_hpc.train.perf import matmul_flops

        self.square.append(matmul_flops(self.device, self.dtype))
        if self.shapes:
            self.model.append(matmul_flops(self.device, self.dtype, shapes=self.shapes))

    def figures(self) -> dict:
        square = max(self.square)
        model = max(self.model) if self.model else None
        return {
            "peak_flops": max(square, model or 0.0),
            "peak_source": f"best of {len(self.square)} matmul measurements interleaved with the timed epochs",
            "square_matmul_flops": square,
            "square_matmul_measurements": self.square,
            "model_gemm_flops": model,
            "model_gemm_shapes": [list(s) for s in self.shapes],
        }


def _time_lightning(lightning: bool, fresh_model, task, batches, default_opt, device, clip, epochs: int):
    """``(figures, timed epoch seconds)`` of Lightning's Trainer; the seconds are None when not measured."""
    if not lightning:
        return {"lightning": "off (--no-lightning)"}, None
    try:
        import lightning as _  # noqa: F401
    except ImportError:
        return {"lightning": "not installed (pip install 'trd-hpc[bench]')"}, None
    sec = _lightning_epochs(fresh_model(), task, batches, default_opt, device, clip, epochs)
    return {"lightning": "measured"}, sec[1:]


def _measure(cfg, root: Path, info, trainer, epochs: int, lightning: bool, compile: bool):
    """Time every loop on the trainer's train subjects: ``(n_used, times, light, compiled)``."""
    ds = trainer.datasets["train"]
    n_used = len(ds)

    batches = _preload(ds, cfg.train.batch_size)
    torch.manual_seed(cfg.train.seed)
    task = make_task(cfg, str(root))
    init = copy.deepcopy(trainer.raw_model.state_dict())
    clip = cfg.train.grad_clip_norm
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam

    def make_opt(params):  # the trainer's optimiser (fused where PyTorch has the kernel)
        return build_optimizer(params, cfg.train)

    def default_opt(params):  # as Lightning's docs write configure_optimizers
        return opt_cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def fresh_model():
        m = task.build_model()
        m.load_state_dict(init)
        return m.to(info.device)

    bare_model = fresh_model()
    bare_opt = make_opt(bare_model.parameters())

    def bare() -> float:
        return _bare_epoch(bare_model, task, batches, bare_opt, info.device, clip)

    def ours() -> float:
        t0 = time.perf_counter()
        trainer.train_epoch(trainer.train_sampler.epoch + 1)
        return time.perf_counter() - t0

    loops = {"bare": bare, "ours": ours}
    compiled = {"compile": "off (--no-compile)"}
    if compile:
        compiled, c_loop = _compiled_loop(fresh_model, make_opt, task, batches, info.device, clip)
        if c_loop is not None:
            loops["compiled"] = c_loop
    print(f"bench train: {n_used} subjects, 1 warm-up + {epochs} timed epochs of {', '.join(loops)} ...", flush=True)
    peaks = None  # a GPU's peak is its datasheet's (perf.peak_flops): nothing to measure between epochs
    if info.device.type != "cuda":
        peaks = PeakMeter(info.device, linear_shapes(bare_model, task.inputs(batches[0], info.device, torch.float32)))
    times = _time_loops(loops, epochs, peaks)
    light, sec = _time_lightning(lightning, fresh_model, task, batches, default_opt, info.device, clip, epochs)
    if sec is not None:
        times["lightning"] = sec
    return n_used, times, light, compiled, peaks


def _figures(
    cfg, trainer, info, threads: int, n_used: int, epochs: int, times: dict, light: dict, compiled: dict, peaks
):
    """The JSON figures of the benchmark."""
    sps = {k: n_used / min(v) for k, v in times.items()}
    if info.device.type == "cuda":
        peak, source = peak_flops(info.device, "fp32")
        pk = {"peak_flops": peak, "peak_source": source}
    else:
        pk = peaks.figures()
        peak = pk["peak_flops"]
    fps = trainer.flops_per_sample
    figures = {
        "benchmark": "train",
        "task": cfg.task,
        "model": cfg.model.name,
        "batch_size": cfg.train.batch_size,
        "threads": threads,
        "subjects_per_epoch": n_used,
        "timed_epochs": epochs,
        "grad_clip_norm": cfg.train.grad_clip_norm,
        "bare_samples_per_s": sps["bare"],
        "ours_samples_per_s": sps["ours"],
        "ratio": sps["ours"] / sps["bare"],
        "target_ratio": 0.95,
        "epoch_seconds": times,
        **light,
        **compiled,
        "flops_per_sample": fps,
        **pk,
        "mfu_ours": fps * sps["ours"] / peak,
        "mfu_bare": fps * sps["bare"] / peak,
    }
    if "lightning" in sps:
        figures.update(
            lightning_samples_per_s=sps["lightning"],
            ratio_vs_lightning=sps["ours"] / sps["lightning"],
            target_ratio_vs_lightning=1.0,
        )
    if "compiled" in sps:
        figures.update(compiled_samples_per_s=sps["compiled"], compile_ratio=sps["compiled"] / sps["bare"])
    return figures


def _print_report(f: dict) -> None:
    n_used = f["subjects_per_epoch"]
    print(
        f"train {f['task']} ({f['model']}), batch {f['batch_size']}, {f['threads']} threads, {n_used} subjects/epoch, fp32"
    )
    print(
        f"  bare PyTorch loop (data in memory): {f['bare_samples_per_s']:7.2f} samples/s  MFU {100 * f['mfu_bare']:.1f}%"
    )
    print(
        f"  trd-hpc Trainer (reads the cohort): {f['ours_samples_per_s']:7.2f} samples/s  MFU {100 * f['mfu_ours']:.1f}%"
    )
    if "lightning_samples_per_s" in f:
        print(f"  Lightning Trainer (data in memory): {f['lightning_samples_per_s']:7.2f} samples/s  (default AdamW)")
    else:
        print(f"  Lightning Trainer: {f['lightning']}")
    if "compiled_samples_per_s" in f:
        print(
            f"  bare loop, torch.compile:           {f['compiled_samples_per_s']:7.2f} samples/s "
            f"(compiled in {f['compile_seconds']:.1f} s)"
        )
    else:
        print(f"  torch.compile: {f['compile']}")
    line = f"  ours/bare {f['ratio']:.3f} (target >= 0.95)"
    if "ratio_vs_lightning" in f:
        line += f"; ours/Lightning {f['ratio_vs_lightning']:.3f} (target >= 1.0)"
    if "compile_ratio" in f:
        line += f"; compiled/bare {f['compile_ratio']:.3f}"
    print(line)
    print(
        f"  {f['flops_per_sample'] / 1e9:.2f} GFLOP/sample; peak {f['peak_flops'] / 1e9:.0f} GFLOP/s ({f['peak_source']})"
    )
    if f.get("square_matmul_flops"):
        gemm = f.get("model_gemm_flops")
        model = f"{gemm / 1e9:.0f} GFLOP/s" if gemm else "n/a (no nn.Linear in the model)"
        print(
            f"  fp32 matmul 1024^3 {f['square_matmul_flops'] / 1e9:.0f} GFLOP/s; the model's "
            f"{len(f['model_gemm_shapes'])} Linear GEMMs at this batch {model}"
        )


def measure(
    config: str | None = None,
    overrides=(),
    subjects: int | None = None,
    scratch_dir: str | None = None,
    json_path: str | None = None,
    epochs: int = 3,
    lightning: bool = True,
    compile: bool = True,
) -> int:
    cfg = load_config(config or "emt", list(overrides))
    steps = max(2, (subjects or 0) // cfg.train.batch_size) if subjects else 8
    n_train = steps * cfg.train.batch_size
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-train-"))
    threads = cfg.train.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg, root, info, trainer = _set_up(cfg, scratch, threads, n_train)
        n_used, times, light, compiled, peaks = _measure(cfg, root, info, trainer, epochs, lightning, compile)
        figures = _figures(cfg, trainer, info, threads, n_used, epochs, times, light, compiled, peaks)
    finally:
        if not scratch_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    _print_report(figures)
    if json_path:
        atomic_write_json(json_path, figures)
    return 0
