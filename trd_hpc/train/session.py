"""One training run in one process: the run directory checked and written, the Trainer,
the final predictions and metrics (``TrainingSession``).  The files it writes are described
in ``trd_hpc.rundir``; which cohort it reads (``trd_hpc.cohort``) and what comes after
(baselines, evaluation, report) are the experiment layer's (``trd_hpc.experiment``).
"""

from __future__ import annotations

import gc
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from trd_hpc import faults
from trd_hpc.config import ConfigError, to_dict
from trd_hpc.console import say
from trd_hpc.data.manifest import cohort_identity, identity_line
from trd_hpc.fsio import atomic_write_json, atomic_write_with
from trd_hpc.locks import DirLock
from trd_hpc.rundir import PREEMPTED, RunDir
from trd_hpc.tasks import make_task
from trd_hpc.train import checkpoint as ckpt
from trd_hpc.train import distributed as D
from trd_hpc.train import signals
from trd_hpc.train.identity import RESUMABLE_CHANGES, differing_keys, flatten
from trd_hpc.train.trainer import Preempted, Trainer

if TYPE_CHECKING:
    pass

__all__ = ["TrainingSession", "RESUMABLE_CHANGES", "read_run_config", "default_label"]


def read_run_config(run_dir: Path):
    """The validated config.yaml of a run directory (RunDirError naming the file otherwise)."""
    return RunDir(run_dir).config()


RESUME_MODES = ("auto", "never", "fresh")


def prepare_run_dir(cfg, run_dir: Path, resume: str | None, info: D.DistInfo) -> str | None:
    """Check a run directory that already holds a run against this config, then write config.yaml.
    Returns what to resume from: 'auto', 'fresh', a checkpoint path, or None (a new run).

    ``resume``: 'auto' continues a run whose config matches (the same command rerun);
    'never' (or None, for library callers) refuses a directory that holds a run; 'fresh'
    starts the same run again from step 0, removing what its earlier training wrote;
    a path resumes from that checkpoint.  The config was fully validated before this
    point, so a failed start never leaves a config.yaml that would refuse the corrected one."""
    cfg_file = run_dir / "config.yaml"
    mode = "never" if resume is None else str(resume)
    if info.is_main:
        trained = bool(ckpt.list_checkpoints(run_dir)) or (run_dir / "model.pt").exists()
        if cfg_file.exists() and not trained:
            # A start that failed before its first checkpoint: nothing to keep, so a
            # corrected config simply replaces the one written then.
            say(f"{run_dir}: no checkpoint yet from the earlier start; starting afresh with this config")
        elif cfg_file.exists():
            if mode == "never":
                raise ConfigError(
                    f"{run_dir} already holds a run and resuming was not allowed (--resume never); rerun without "
                    f"it to continue the run (it continues when the config matches), or use another --out"
                )
            old = flatten(to_dict(read_run_config(run_dir)))
            diffs = differing_keys(old, flatten(to_dict(cfg)))
            if diffs:
                raise ConfigError(
                    f"cannot continue {run_dir}: the config differs from {cfg_file} in " + ", ".join(diffs) + "; "
                    "use another --out for a new run"
                )
            if mode == "fresh":
                removed = _remove_training_outputs(run_dir)
                say(f"{run_dir}: --resume fresh: starting the run again from step 0 (removed {removed})")
            elif mode == "auto":
                say(f"{run_dir} holds this run (same config): continuing it (--resume never refuses instead)")
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).write_config(cfg)
        (run_dir / PREEMPTED).unlink(missing_ok=True)
    D.barrier(info)
    return None if mode == "never" else mode


def _remove_training_outputs(run_dir: Path) -> str:
    """What --resume fresh clears: checkpoints, weights, metrics, predictions (not baselines:
    the config is the same, so they are still this run's)."""
    import shutil

    run = RunDir(run_dir)
    gone = []
    for p in (ckpt.checkpoint_dir(run_dir), run.path / "predictions"):
        if p.is_dir():
            n = sum(1 for _ in p.iterdir())
            shutil.rmtree(p)
            gone.append(f"{p.name}/ ({n} entries)")
    for p in (run.model_file, run.metrics_file, run.path / "metrics.jsonl"):
        if p.exists():
            p.unlink()
            gone.append(p.name)
    return ", ".join(gone) or "nothing"


def final_metrics(trainer: Trainer, val_m: dict, test_m: dict, seconds: float, hosts: list[str]) -> dict:
    st = trainer.state
    out = {f"val.{k}": v for k, v in val_m.items()}
    out.update({f"test.{k}": v for k, v in test_m.items()})
    out.update(
        {
            "best_epoch": trainer.early.best_epoch,
            "epochs_run": st.epoch,
            "stopped_early": st.stopped_early,
            "steps": st.step,
            "world_size": trainer.info.world_size,
            "hosts": hosts,  # rank r ran on hosts[r]
            "strategy": trainer.tc.strategy,
            "precision": trainer.precision,
            "train_seconds": seconds,
            "flops_per_sample": trainer.flops_per_sample,
        }
    )
    for role in ("train", "val"):  # the subjects read (data.complete_cases leaves some out)
        out[f"{role}.subjects"] = len(trainer.datasets[role])
        if trainer.cfg.data.complete_cases:
            out[f"{role}.left_out"] = len(trainer.datasets[role].left_out)
    if st.history:
        out["train.samples_per_s"] = float(np.mean([r.get("train.samples_per_s", np.nan) for r in st.history]))
        out["train.mfu"] = float(np.mean([r.get("train.mfu", np.nan) for r in st.history]))
    return out


class TrainingSession:
    """One training run's process-wide state, entered once per process: the process group,
    the run directory's lock, the tracker.  Its steps are called by the experiment layer
    (``trd_hpc.experiment.train_run``) in order:

        with TrainingSession(cfg, run_dir) as s:
            s.start(cohort_root, resume)   # config.yaml, the tracker, the Trainer, a checkpoint
            metrics = s.fit()              # train, then final predictions and metrics.json
            metrics = s.on_main(stage)     # rank 0 works, the other ranks wait in the job

    Leaving it shuts the process group down, finishes the tracker and releases the lock,
    whatever happened."""

    def __init__(self, cfg, run_dir: str | Path, standalone: bool = False):
        signals.install()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.info = D.init(cfg.train.strategy, cfg.train.device, standalone=standalone)
        faults.set_rank(self.info.rank)
        self.lock = DirLock(self.run_dir, "run directory") if self.info.is_main else None
        self.tracker = None
        self.trainer: Trainer | None = None
        self.identity: dict | None = None
        self.preempted = False  # fit stopped at a signal (every rank), a checkpoint written

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            # DDP's reducer holds the process group: destroy_process_group only drops the
            # registry's reference, and a group freed later, during interpreter shutdown,
            # can abort the process (gloo: "terminate called without an active exception").
            # So the trainer goes first, and on a clean exit every rank is past its last
            # collective before any rank tears its group down.
            self.trainer = None
            gc.collect()
            D.shutdown(self.info, synchronize=exc_type is None)
        finally:
            if self.tracker is not None:
                self.tracker.finish()
            if self.lock is not None:
                self.lock.release()

    def start(self, root: Path, resume: str | None, progress: bool = True) -> None:
        from trd_hpc.tracking import Tracker

        info, run_dir = self.info, self.run_dir
        self.identity = cohort_identity(root)
        if info.is_main:
            say(f"cohort {root}: {identity_line(self.identity)}")
        if self.lock is not None:  # before anything is written into the run directory
            self.lock.acquire()
            ckpt.remove_stale(run_dir)
        resume = prepare_run_dir(self.cfg, run_dir, resume, info)
        # rank 0 only; resumes its W&B id
        self.tracker = Tracker.start(self.cfg, run_dir, info.rank, cohort=self.identity)
        self.trainer = Trainer(self.cfg, make_task(self.cfg, str(root)), run_dir, info, root, progress=progress)
        if resume:
            path = self.trainer.load_checkpoint(resume)
            if info.is_main:
                say(
                    f"resumed from {path} (epoch {self.trainer.state.epoch + 1}, step {self.trainer.state.step})"
                    if path
                    else "no checkpoint yet: starting from scratch"
                )

    def fit(self, on_step=None, on_epoch=None) -> dict | None:
        """Train, then predict val and test with the final model; the metrics on rank 0 (None
        elsewhere, or when pre-empted: the checkpoint and PREEMPTED say where to go on)."""
        trainer, info, run, tracker = self.trainer, self.info, RunDir(self.run_dir), self.tracker

        def _on_epoch(tr, row):
            tracker.log_epoch(row)
            if on_epoch is not None:
                on_epoch(tr, row)

        t0 = time.perf_counter()
        try:
            trainer.fit(on_step=on_step, on_epoch=_on_epoch)
        except Preempted as p:
            self.preempted = True
            if info.is_main:
                atomic_write_json(
                    run.path / PREEMPTED, {"step": p.step, "signal": p.signame, "checkpoint": str(p.path)}
                )
                say(f"{p}; continue with --resume auto")
            return None
        val_m, val_rec = trainer.evaluate("val")
        test_m, test_rec = trainer.evaluate("test")
        hosts = D.all_gather_objects(info, socket.gethostname())
        metrics = None
        if info.is_main:
            run.write_predictions("val", val_rec)
            run.write_predictions("test", test_rec)
            state = trainer.raw_model.state_dict()
            atomic_write_with(run.model_file, lambda tmp: torch.save(state, tmp), fault="model")
            metrics = final_metrics(trainer, val_m, test_m, time.perf_counter() - t0, hosts)
            metrics["cohort"] = self.identity  # what these figures rest on
            atomic_write_json(run.metrics_file, metrics, fault="metrics")
            tracker.log_summary(metrics)
        D.barrier(info)
        return metrics

    def on_main(self, stage: Callable[[Path], dict | None]) -> dict | None:
        """``stage(run_dir) -> metrics`` on rank 0 while the other ranks wait, still part of
        the job: a rank that exits while rank 0 works can end the whole srun step
        (--kill-on-bad-exit) and take that work with it.  What it returns (None: pre-empted
        during the stage) is logged and is the run's metrics from then on."""
        from trd_hpc.tracking import figures_of

        info, metrics = self.info, None
        try:
            if info.is_main:
                metrics = stage(self.run_dir)
                if metrics is not None:
                    self.tracker.log_summary(metrics)
                    self.tracker.log_figures(figures_of(self.run_dir))
            else:
                D.wait_for_main(info)
        finally:
            if info.is_main:
                D.release_others(info)
        D.barrier(info)  # rank 0 stays until every rank has seen the release
        return metrics


def default_label(cfg) -> str:
    """The task (``emt``, ``cnn3d``), with the model's name when it is not the task's own model
    (``[cnn3d resnet18]``), so a baseline trained as a run of its own says what it is."""
    model = getattr(cfg, "model", None)
    field = type(model).model_fields.get("name") if model is not None else None
    if field is None or model.name == field.default:
        return cfg.task
    return f"{cfg.task} {model.name}"
