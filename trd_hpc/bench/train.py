"""``trd-hpc bench train``: the trainer's samples/s against a bare PyTorch loop.

Same model, same batch size, same subjects, measured in one run:
* bare: the batches preloaded as tensors in memory, then forward, BCE /
  multi-task loss, backward, optimiser step, zero_grad, nothing else;
* ours: ``Trainer.train_epoch`` over the same subjects read from the cohort
  (page cache warm), with its sampler, loader, finiteness and signal checks,
  per-subject records and progress accounting;
* Lightning's Trainer on the bare loop's data, when pytorch_lightning is installed.
Target: ours/bare >= 0.95.  The MFU estimate uses the model's FLOPs per sample
and this machine's measured matmul rate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from trd_hpc.config import derive, load_config
from trd_hpc.data.generate import generate
from trd_hpc.fsio import atomic_write_json
from trd_hpc.tasks import make_task
from trd_hpc.train import distributed as D
from trd_hpc.train.perf import peak_flops
from trd_hpc.train.trainer import Trainer


def _bare_epoch(model, task, batches, opt, device) -> float:
    model.train()
    t0 = time.perf_counter()
    for b in batches:
        out = model(**task.inputs(b, device, torch.float32))
        loss, _ = task.loss(out, b, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run(
    config: str | None = None,
    overrides=(),
    subjects: int | None = None,
    scratch_dir: str | None = None,
    json_path: str | None = None,
) -> int:
    cfg = load_config(config or "configs/emt.yaml", list(overrides))
    steps = max(2, (subjects or 0) // cfg.train.batch_size) if subjects else 8
    n_train = steps * cfg.train.batch_size
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="trd-bench-train-"))
    threads = cfg.train.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # A cohort whose train split is exactly `steps` full batches.
        n = int(
            round(
                n_train / cfg.cohort.split.train
                if hasattr(cfg.cohort.split, "train")
                else n_train / ((1 - cfg.cohort.split.test) * (1 - cfg.cohort.split.val))
            )
        )
        n += n % 2
        root = scratch / "cohort"
        cfg = derive(
            cfg,
            {
                "cohort.n_subjects": n,
                "cohort.subjects_per_shard": max(n // 4, 1),
                "data.cohort": str(root),
                "data.num_workers": 0,
                "train.strategy": "single",
                "train.num_threads": threads,
            },
            "bench train",
        )
        print(f"bench train: making a {cfg.task} cohort of {n} subjects in {root} ...", flush=True)
        generate(cfg.cohort, root, workers=1, progress=False)
        info = D.DistInfo()
        trainer = Trainer(cfg, make_task(cfg, str(root)), scratch / "run", info, root, progress=False)
        ds = trainer.datasets["train"]
        n_used = len(ds)

        # The same subjects, preloaded as batches, for the bare loop.
        ids = list(range(len(ds)))
        batches = []
        for lo in range(0, len(ids), cfg.train.batch_size):
            b = ds.__getitems__(ids[lo : lo + cfg.train.batch_size])
            batches.append({k: v.clone() for k, v in b.items()})
        torch.manual_seed(cfg.train.seed)
        task = make_task(cfg, str(root))
        bare_model = task.build_model()
        bare_model.load_state_dict(trainer.raw_model.state_dict())
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        bare_opt = opt_cls(bare_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        # Warm-up both (allocator, first-touch, one-time kernels), then alternate timed epochs.
        _bare_epoch(bare_model, task, batches, bare_opt, info.device)
        trainer.train_epoch(0)
        bare_t, ours_t = [], []
        for e in range(1, 3):
            bare_t.append(_bare_epoch(bare_model, task, batches, bare_opt, info.device))
            t0 = time.perf_counter()
            trainer.train_epoch(e)
            ours_t.append(time.perf_counter() - t0)
        bare_sps = n_used / min(bare_t)
        ours_sps = n_used / min(ours_t)
        peak, source = peak_flops(info.device, "fp32")
        figures = {
            "benchmark": "train",
            "task": cfg.task,
            "model": cfg.model.name,
            "batch_size": cfg.train.batch_size,
            "threads": threads,
            "subjects_per_epoch": n_used,
            "bare_samples_per_s": bare_sps,
            "ours_samples_per_s": ours_sps,
            "ratio": ours_sps / bare_sps,
            "target_ratio": 0.95,
            "flops_per_sample": trainer.flops_per_sample,
            "peak_flops": peak,
            "peak_source": source,
            "mfu_ours": trainer.flops_per_sample * ours_sps / peak,
            "mfu_bare": trainer.flops_per_sample * bare_sps / peak,
        }
        try:
            import pytorch_lightning  # noqa: F401

            figures["lightning"] = "installed but not measured by this version of the benchmark"
        except ImportError:
            figures["lightning"] = "not installed"
    finally:
        if not scratch_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    f = figures
    print(
        f"train {f['task']} ({f['model']}), batch {f['batch_size']}, {f['threads']} threads, {f['subjects_per_epoch']} subjects/epoch, fp32"
    )
    print(
        f"  bare PyTorch loop (data in memory): {f['bare_samples_per_s']:7.2f} samples/s  MFU {100 * f['mfu_bare']:.1f}%"
    )
    print(
        f"  trd-hpc Trainer (reads the cohort): {f['ours_samples_per_s']:7.2f} samples/s  MFU {100 * f['mfu_ours']:.1f}%"
    )
    print(
        f"  ratio {f['ratio']:.3f} (target >= 0.95); {f['flops_per_sample'] / 1e9:.2f} GFLOP/sample; "
        f"peak {f['peak_flops'] / 1e9:.0f} GFLOP/s ({f['peak_source']}); PyTorch Lightning: {f['lightning']}"
    )
    if json_path:
        atomic_write_json(json_path, figures)
    return 0
