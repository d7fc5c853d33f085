"""``trd-hpc train``: cohort (made if missing) -> run directory -> Trainer -> final
predictions and metrics -> evaluation stage (calibration, figures, report).

Run directory:
  config.yaml        the resolved experiment config
  metrics.jsonl      one row per epoch
  metrics.json       final metrics (test.*, val.*, calibration, baselines)
  model.pt           the best weights (state_dict; loads with weights_only=True)
  checkpoints/       resumable training state
  predictions/       val.npz, test.npz (per-subject outputs)
  figures/, report.html
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trd_hpc.config import ConfigError, load_config, to_dict, to_yaml, validate_experiment
from trd_hpc.data.generate import generate
from trd_hpc.data.manifest import MANIFEST, load_manifest
from trd_hpc.train import distributed as D
from trd_hpc.train import signals
from trd_hpc.train.tasks import make_task
from trd_hpc.train.trainer import Preempted, Trainer

PREEMPTED = "PREEMPTED"
# Keys that may change when a run is resumed (more epochs, another launcher).
RESUMABLE_CHANGES = ("train.max_epochs", "train.strategy", "train.num_threads", "data.num_workers",
                     "train.checkpoint_every_steps", "train.log_every_steps", "tracking.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ensure_cohort(cfg, info: D.DistInfo, progress: bool = True) -> Path:
    """The config's cohort directory, generated first (by rank 0) when absent."""
    root = Path(cfg.data.cohort)
    if info.is_main and not (root / MANIFEST).exists():
        print(f"cohort {root} not found: generating it from the config's cohort section", flush=True)
        generate(cfg.cohort, root, progress=progress)
    D.barrier(info)
    m = load_manifest(root)
    have = {k: v for k, v in to_dict(m.config).items() if k != "subjects_per_shard"}
    want = {k: v for k, v in to_dict(cfg.cohort).items() if k != "subjects_per_shard"}
    if have != want:
        diffs = sorted(k for k, v in _flat(want).items() if _flat(have).get(k) != v)
        raise ConfigError(
            f"data.cohort={root} holds a cohort made with another config (differs in: "
            f"{', '.join('cohort.' + k for k in diffs)}); point data.cohort at a new directory"
        )
    return root


def prepare_run_dir(cfg, run_dir: Path, resume: str | None, info: D.DistInfo) -> None:
    cfg_file = run_dir / "config.yaml"
    if info.is_main:
        if cfg_file.exists():
            if not resume:
                raise ConfigError(f"{run_dir} already holds a run; pass --resume auto to continue it, or use another --out")
            import yaml

            old = _flat(to_dict(validate_experiment(yaml.safe_load(cfg_file.read_text()), str(cfg_file))))
            new = _flat(to_dict(cfg))
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
                     and not any(k.startswith(p) for p in RESUMABLE_CHANGES)]
            if diffs:
                raise ConfigError(
                    f"cannot resume {run_dir}: the config differs from {cfg_file} in " + ", ".join(diffs)
                )
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(to_yaml(cfg))
        (run_dir / PREEMPTED).unlink(missing_ok=True)
    D.barrier(info)


def save_predictions(run_dir: Path, split: str, rec: dict) -> None:
    d = run_dir / "predictions"
    d.mkdir(exist_ok=True)
    np.savez(d / f"{split}.npz", **rec)


def final_metrics(trainer: Trainer, val_m: dict, test_m: dict, seconds: float) -> dict:
    st = trainer.state
    out = {f"val.{k}": v for k, v in val_m.items()}
    out.update({f"test.{k}": v for k, v in test_m.items()})
    out.update({
        "best_epoch": trainer.early.best_epoch,
        "epochs_run": st.epoch,
        "stopped_early": st.stopped_early,
        "steps": st.step,
        "world_size": trainer.info.world_size,
        "strategy": trainer.tc.strategy,
        "precision": trainer.precision,
        "train_seconds": seconds,
        "flops_per_sample": trainer.flops_per_sample,
    })
    if st.history:
        out["train.samples_per_s"] = float(np.mean([r.get("train.samples_per_s", np.nan) for r in st.history]))
        out["train.mfu"] = float(np.mean([r.get("train.mfu", np.nan) for r in st.history]))
    return out


def train(cfg, run_dir: str | Path, resume: str | None = None, evaluate_after: bool = True,
          progress: bool = True, on_step=None, on_epoch=None) -> dict | None:
    """Train one run; returns the final metrics on rank 0 (None elsewhere or when pre-empted).

    ``on_step(trainer)`` runs after every optimiser step and ``on_epoch(trainer, row)``
    after each epoch's checkpoint is written (Ray Tune reports there)."""
    signals.install()
    from trd_hpc.tracking import Tracker, figures_of

    run_dir = Path(run_dir)
    info = D.init(cfg.train.strategy, cfg.train.device)
    tracker = Tracker.noop()
    try:
        try:
            root = ensure_cohort(cfg, info, progress)
            prepare_run_dir(cfg, run_dir, resume, info)
            tracker = Tracker.start(cfg, run_dir, info.rank)  # rank 0 only; resumes the run's W&B id
            trainer = Trainer(cfg, make_task(cfg, str(root)), run_dir, info, root, progress=progress)
            if resume:
                path = trainer.load_checkpoint(resume)
                if info.is_main:
                    print(f"resumed from {path} (epoch {trainer.state.epoch + 1}, step {trainer.state.step})"
                          if path else "no checkpoint yet: starting from scratch", flush=True)

            def _on_epoch(tr, row):
                tracker.log_epoch(row)
                if on_epoch is not None:
                    on_epoch(tr, row)

            t0 = time.perf_counter()
            try:
                trainer.fit(on_step=on_step, on_epoch=_on_epoch)
            except Preempted as p:
                if info.is_main:
                    (run_dir / PREEMPTED).write_text(json.dumps({"step": p.step, "signal": p.signame, "checkpoint": str(p.path)}))
                    print(f"{p}; continue with --resume auto", flush=True)
                return None
            val_m, val_rec = trainer.evaluate("val")
            test_m, test_rec = trainer.evaluate("test")
            metrics = None
            if info.is_main:
                save_predictions(run_dir, "val", val_rec)
                save_predictions(run_dir, "test", test_rec)
                torch.save(trainer.raw_model.state_dict(), run_dir / "model.pt")
                metrics = final_metrics(trainer, val_m, test_m, time.perf_counter() - t0)
                (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
                tracker.log_summary(metrics)
            D.barrier(info)
        finally:
            D.shutdown(info)
        if info.is_main and evaluate_after:
            from trd_hpc.eval.pipeline import run_evaluation

            metrics = run_evaluation(run_dir)
            tracker.log_summary(metrics)
            tracker.log_figures(figures_of(run_dir))
        return metrics
    finally:
        tracker.finish()
