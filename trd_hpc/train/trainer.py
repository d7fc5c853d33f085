"""One training loop for every model and strategy (single process, DDP, DeepSpeed).

Per epoch: train over this rank's part of the split, evaluate on the whole
validation split (predictions gathered from every rank, padding dropped), then
take the LR-plateau and early-stopping decisions once, on rank 0, and hand
them to every rank.  State that matters for an exact resume (weights,
optimiser, scheduler, scaler, early stopping, sampler position, every rank's
RNG) is checkpointed atomically every N steps, at each epoch end and when a
pre-emption signal arrives.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from trd_hpc import faults
from trd_hpc.console import prefix as console_prefix
from trd_hpc.console import say
from trd_hpc.data.dataset import CohortDataset, make_loader
from trd_hpc.data.sampler import ShardAwareSampler
from trd_hpc.errors import TrainingError  # noqa: E402  (re-exported)
from trd_hpc.rundir import RunDir
from trd_hpc.tasks.base import FlopsEstimate, Task, merge_records
from trd_hpc.train import checkpoint as ckpt
from trd_hpc.train import distributed as D
from trd_hpc.train import identity, signals
from trd_hpc.train.ledger import Ledger
from trd_hpc.train.plan import threads_per_process
from trd_hpc.train.strategy import make_strategy

if TYPE_CHECKING:
    from trd_hpc.config import ExperimentConfig


class Preempted(Exception):
    """Raised after the pre-emption checkpoint is written."""

    def __init__(self, step: int, signame: str, path: Path):
        super().__init__(f"{signame} received: checkpoint at step {step} written to {path}")
        self.step, self.signame, self.path = step, signame, path


@dataclass
class EarlyStopping:
    mode: str
    patience: int
    tie_mode: str | None = None  # train.early_stopping.tie_breaker's mode, if any
    best: float = math.nan
    best_epoch: int = -1
    bad_epochs: int = 0
    best_tie: float = math.nan

    @staticmethod
    def _better(a: float, b: float, mode: str) -> bool:
        return a > b if mode == "max" else a < b

    def improved(self, value: float, tie: float = math.nan) -> bool:
        if math.isnan(value):
            return False
        if math.isnan(self.best) or self._better(value, self.best, self.mode):
            return True
        if value != self.best or self.tie_mode is None or math.isnan(tie):
            return False
        return math.isnan(self.best_tie) or self._better(tie, self.best_tie, self.tie_mode)

    def update(self, value: float, epoch: int, tie: float = math.nan) -> tuple[bool, bool]:
        """(is_new_best, should_stop)."""
        if self.improved(value, tie):
            self.best, self.best_epoch, self.bad_epochs, self.best_tie = value, epoch, 0, tie
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_tie": self.best_tie,
        }

    def load_state_dict(self, s: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = float(s["best"]), int(s["best_epoch"]), int(s["bad_epochs"])
        self.best_tie = float(s.get("best_tie", math.nan))


class LRPlateau:
    """torch's ReduceLROnPlateau driving any optimiser's param groups.

    The scheduler runs on a one-parameter proxy optimiser and its learning
    rate is copied to the real one, so the same code serves torch optimisers
    and DeepSpeed's wrappers (which are not torch Optimizers)."""

    def __init__(self, optimizer, lr: float, mode: str, factor: float, patience: int, min_lr: float):
        self.optimizer = optimizer
        self._proxy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._proxy, mode=mode, factor=factor, patience=patience, min_lr=min_lr
        )
        self._apply()

    @property
    def lr(self) -> float:
        return float(self._proxy.param_groups[0]["lr"])

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr

    def step(self, value: float) -> None:
        if not math.isnan(value):
            self.sched.step(value)
        self._apply()

    def state_dict(self) -> dict:
        return {"sched": self.sched.state_dict(), "lr": self.lr}

    def load_state_dict(self, s: dict) -> None:
        self.sched.load_state_dict(s["sched"])
        self._proxy.param_groups[0]["lr"] = float(s["lr"])
        self._apply()


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (or next to run)
    step: int = 0  # optimiser steps done
    history: list[dict] = field(default_factory=list)
    finished: bool = False
    stopped_early: bool = False
    # The epoch in progress, so far: per-subject records and losses of its
    # steps, and seconds spent.  Checkpointed, so a resumed epoch reports
    # the same train metrics as an uninterrupted one.
    epoch_records: list[dict] = field(default_factory=list)
    epoch_seconds: float = 0.0


def _owned(records: dict) -> dict[str, np.ndarray]:
    """A step's records copied into arrays of their own, kept until the epoch ends.

    A task's records are NumPy views of the step's tensors; kept as they are, every step
    leaves a few small torch allocations alive among its large transient ones (activations,
    workspaces, batch buffers), and the heap can neither reuse nor return the space between
    them: resident memory grew 0.45 MB a step (+170 MB over 400 steps of one 14,450-subject
    epoch of the 3-D CNN, nothing on the 1,083-subject cohort whose epochs end every 68 steps).
    The copies are a few hundred bytes a step."""
    return {k: np.array(v, copy=True) for k, v in records.items()}


def _split_batch(batch: dict, parts: int) -> list[dict]:
    """A loaded batch as ``parts`` micro-batches (equal by construction of the sampler).

    Each piece is copied into memory of its own: a view into the middle of the batch can
    start at an address that makes the CPU kernels take another vector path, and then a
    process accumulating micro-batches no longer matches, bit for bit, the processes that
    load them one each."""
    if parts == 1:
        return [batch]
    pieces = {k: torch.tensor_split(v, parts) for k, v in batch.items()}
    return [{k: p[j].clone() for k, p in pieces.items()} for j in range(parts) if len(pieces["subject_id"][j])]


class Trainer:
    def __init__(
        self,
        cfg: "ExperimentConfig",
        task: Task,
        run_dir: Path,
        info: D.DistInfo,
        cohort_root: Path,
        progress: bool = True,
    ):
        self.cfg, self.task, self.run_dir, self.info = cfg, task, Path(run_dir), info
        self.tc = cfg.train
        self.cohort_root = Path(cohort_root)
        self.progress = progress and info.is_main
        self.device = info.device
        self.state = TrainState()
        self._setup()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        tc, info = self.tc, self.info
        threads = tc.num_threads or threads_per_process(info.local_world_size)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        torch.manual_seed(tc.seed)  # same initial weights on every rank
        model = self.task.build_model().to(self.device)
        self.flops_per_sample = self.task.flops_per_sample(model)
        # MFU on the console only from a model's own FLOP formula (tasks.base.FlopsEstimate)
        self.show_mfu = not isinstance(self.flops_per_sample, FlopsEstimate)

        self.datasets = {
            role: CohortDataset(
                self.cohort_root,
                self.cfg.data.split(role),
                normalize_volumes=self.cfg.data.normalize_volumes,
                complete=self.cfg.data.complete(role),
            )
            for role in ("train", "val", "test")
        }
        # the manifest the datasets already read, not a fourth read of it
        self.identity = identity.run_identity(self.cfg, self.datasets["train"].manifest)
        for ds in self.datasets.values():
            # Content checked before the first step (a flipped bit, a foreign shard), not mid-epoch;
            # forked loader workers inherit the result.
            ds.verify_all()
        bs = tc.batch_size
        self.accum = tc.grad_accum_steps
        self.train_sampler = ShardAwareSampler.for_dataset(
            self.datasets["train"],
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=tc.seed,
            block=self.cfg.data.locality_block,
            batch_size=bs,
            accum=self.accum,
        )
        # One loaded batch = one optimiser step's micro-batches, split in train_epoch.
        self.loaders = {"train": self._loader("train", self.train_sampler, bs * self.accum)}

        self.strategy = make_strategy(tc, info, self.device)
        self.strategy.setup(model)
        st = self.strategy
        self.model, self.raw_model, self.optimizer = st.model, st.raw_model, st.optimizer
        self.precision, self.in_dtype, self.autocast_dtype = st.precision, st.in_dtype, st.autocast_dtype
        self.zero_stage = st.zero_stage
        p = tc.plateau
        self.plateau = LRPlateau(self.optimizer, tc.lr, p.mode, p.factor, p.patience, p.min_lr)
        tie = tc.early_stopping.tie_breaker
        self.early = EarlyStopping(tc.early_stopping.mode, tc.early_stopping.patience, tie.mode if tie else None)
        self.best_state: dict | None = None
        self._peak = None
        self._ledger = None  # train.ledger: this attempt's file, opened at its first step

    def _loader(self, split: str, sampler: ShardAwareSampler, batch_size: int | None = None):
        d = self.cfg.data
        return make_loader(
            self.datasets[split],
            batch_size or self.tc.batch_size,
            sampler,
            num_workers=d.num_workers,
            prefetch_factor=d.prefetch_factor,
            worker_type=d.worker_type,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.tc.seed),
        )

    def eval_loader(self, split: str):
        s = ShardAwareSampler.for_dataset(
            self.datasets[split],
            num_replicas=self.info.world_size,
            rank=self.info.rank,
            shuffle=False,
            block=self.cfg.data.locality_block,
        )
        return self._loader(split, s)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, model, batch):
        inputs = self.task.inputs(batch, self.device, self.in_dtype)
        with self._autocast():
            return model(**inputs)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, split: str) -> dict[str, np.ndarray]:
        """Per-subject records of ``split`` gathered from every rank (each subject once)."""
        model = self.raw_model
        was_training = model.training
        model.eval()
        parts = []
        for batch in self.eval_loader(split):
            out = self._forward(model, batch)
            parts.append(_owned(self.task.records(out, batch)))
        model.train(was_training)
        local = merge_records(parts)
        gathered = D.all_gather_objects(self.info, local)
        return merge_records(gathered)

    @torch.no_grad()
    def recompute_bn_stats(self) -> None:
        """Precise BatchNorm: running statistics re-estimated as a plain average over
        the first ``train.precise_bn_batches`` training batches (fixed order) at the
        current weights.  Dropout stays off, so no RNG is drawn; rank 0's statistics
        are then sent to every rank so all evaluate the same model."""
        n = self.tc.precise_bn_batches
        bns = [m for m in self.raw_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not n or not bns:
            return
        model = self.raw_model
        was_training = model.training
        model.eval()
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        s = ShardAwareSampler.for_dataset(self.datasets["train"], shuffle=False, block=self.cfg.data.locality_block)
        for i, batch in enumerate(self._loader("train", s)):
            if i >= n:
                break
            self._forward(model, batch)
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
        if self.info.distributed:
            import torch.distributed as dist

            for m in bns:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    dist.broadcast(buf, src=0)

    def evaluate(self, split: str) -> tuple[dict, dict]:
        rec = self.predict(split)
        metrics = self.task.metrics(rec) if self.info.is_main and rec else {}
        metrics = D.broadcast_object(self.info, metrics)
        return metrics, rec

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "history": self.state.history,
            "sampler": self.train_sampler.state_dict(),
            "early": self.early.state_dict(),
            "plateau": self.plateau.state_dict(),
            "world_size": self.info.world_size,
            "strategy": self.tc.strategy,
            "precision": self.precision,
            "zero_stage": self.zero_stage,
            "finished": self.state.finished,
            "stopped_early": self.state.stopped_early,
            "epoch_seconds": self.state.epoch_seconds,
            "identity": self.identity,
        }

    def _log_ledger(self, epoch: int, batch: dict) -> None:
        if self._ledger is None:  # this attempt's file, named by the step it started from
            self._ledger = Ledger(self.run_dir, self.state.step - 1, self.info.world_size, self.info.rank)
        self._ledger.write(epoch, self.state.step, batch)

    def save_checkpoint(self) -> Path:
        if self._ledger is not None:  # every row up to this checkpoint is on disk before it
            self._ledger.flush()
        # Every rank's RNG, and the epoch's records from every rank (rank 0 restores them all).
        gathered = D.all_gather_objects(self.info, (ckpt.capture_rng(), merge_records(self.state.epoch_records)))
        rngs = [g[0] for g in gathered]
        trainer = self._trainer_state()
        trainer["epoch_records"] = ckpt.records_to_tensors(merge_records([g[1] for g in gathered]))
        return self.strategy.save(
            self.run_dir, self.state.step, {"trainer": trainer, "rng": rngs, "best_model": self.best_state}
        )

    def _check_identity(self, path: Path, trainer: dict) -> None:
        """Refuse a checkpoint of another run (other config keys, other cohort content)."""
        theirs = trainer.get("identity")
        if theirs is None:
            raise TrainingError(
                f"{path}: written by an older trd-hpc without a run identity; "
                f"it cannot be checked against this run, so it is not resumed"
            )
        keys = identity.differing_keys(theirs["config"], self.identity["config"])
        if keys:
            shown = ", ".join(
                f"{k} ({theirs['config'].get(k)!r} there, {self.identity['config'].get(k)!r} here)" for k in keys[:6]
            )
            raise TrainingError(
                f"{path}: checkpoint of another run: its config differs in {shown}"
                + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            )
        if theirs["cohort_sha256"] != self.identity["cohort_sha256"]:
            raise TrainingError(
                f"{path}: checkpoint trained on another cohort (shard checksums or splits differ "
                f"from {self.cohort_root}); resume it with the cohort it was trained on"
            )

    def load_checkpoint(self, where: str | Path) -> Path | None:
        """Resume from ``where`` ('auto': newest valid under the run dir; 'fresh': the same, but
        a run whose checkpoints are all unreadable starts again). Returns the path or None."""
        if str(where) in ("auto", "fresh"):
            found = ckpt.newest_valid(self.run_dir, fresh=str(where) == "fresh")
            if found is None:
                return None
            path, state = found
        else:
            path = Path(where)
            if not path.exists():
                raise TrainingError(f"--resume {path}: no such checkpoint")
            state = None if path.is_dir() else ckpt.load_file(path)
        client = self.strategy.load(path, state, self._check_identity)
        trainer, rngs, best = client["trainer"], client["rng"], client.get("best_model")
        stopped = bool(trainer.get("stopped_early", False))
        # A run that ended at max_epochs continues when resumed with a larger train.max_epochs.
        records = ckpt.records_from_tensors(trainer.get("epoch_records") or {})
        self.state = TrainState(
            epoch=trainer["epoch"],
            step=trainer["step"],
            history=list(trainer["history"]),
            finished=stopped or trainer["epoch"] >= self.tc.max_epochs,
            stopped_early=stopped,
            epoch_records=[records] if records and self.info.is_main else [],
            epoch_seconds=float(trainer.get("epoch_seconds", 0.0)),
        )
        self.early.load_state_dict(trainer["early"])
        self.plateau.load_state_dict(trainer["plateau"])
        self.best_state = best
        same_world = trainer["world_size"] == self.info.world_size
        if same_world:
            self.train_sampler.load_state_dict(trainer["sampler"])
            ckpt.restore_rng(rngs[self.info.rank])
        else:  # DDP at another world size: same epoch, same number of samples consumed in all
            self.train_sampler.resume_at(trainer["sampler"])
            torch.manual_seed(self.tc.seed * 1000003 + self.state.step * 101 + self.info.rank)
        return path

    # ------------------------------------------------------------------ loop
    def _peak_flops(self) -> float:
        if self._peak is None:
            from trd_hpc.train.perf import peak_flops

            self._peak, self.peak_source = peak_flops(self.device, self.precision)
        return self._peak

    def _write_history(self) -> None:
        if self.info.is_main:
            RunDir(self.run_dir).write_history(self.state.history)

    def train_epoch(self, epoch: int, on_step=None) -> dict:
        tc, info = self.tc, self.info
        if self.train_sampler.epoch != epoch:
            self.train_sampler.set_epoch(epoch)
        self.model.train()
        n_batches = math.ceil(len(self.train_sampler) / (tc.batch_size * self.accum))
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=n_batches,
                desc=f"{console_prefix()}epoch {epoch + 1}/{tc.max_epochs}",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )
        parts, losses = self.state.epoch_records, []  # a resumed epoch continues its records
        samples, t0, seconds_before = 0, time.perf_counter(), self.state.epoch_seconds
        peak = self._peak_flops()
        for i, batch in enumerate(self.loaders["train"]):
            # One optimiser step: the loaded batch is this process's `accum` micro-batches.
            micro = _split_batch(batch, self.accum)
            finite, step_loss = True, 0.0
            for j, mb in enumerate(micro):
                last_micro = j == len(micro) - 1
                with self.strategy.no_sync(not last_micro):
                    out = self._forward(self.model, mb)
                    loss, _ = self.task.loss(out, mb, self.device)
                    finite &= bool(torch.isfinite(loss.detach()))
                    self.strategy.backward(loss, len(micro), last_micro)
                step_loss += float(loss.detach()) / len(micro)
                parts.append(_owned(self.task.records(out, mb)))
            nonfinite, stop = D.any_flag(info, not finite, signals.requested() is not None)
            if nonfinite:
                good = ckpt.list_checkpoints(self.run_dir)
                raise TrainingError(
                    f"loss became NaN/inf at step {self.state.step + 1} (epoch {epoch + 1}); weights were not "
                    f"updated with it. Last good checkpoint: {good[0][1] if good else 'none yet'}. "
                    f"Lower train.lr, set train.grad_clip_norm, or use train.precision=fp32."
                )
            faults.point("mid-step", self.state.step + 1)
            self.strategy.step()
            self.state.step += 1
            if tc.ledger:
                self._log_ledger(epoch, batch)
            bsz = len(batch["subject_id"])
            self.train_sampler.start += bsz
            samples += bsz
            losses.append(step_loss)
            self.state.epoch_seconds = seconds_before + time.perf_counter() - t0
            faults.point("after-step", self.state.step)
            if on_step is not None:
                on_step(self)
            if bar is not None:
                dt = max(time.perf_counter() - t0, 1e-9)
                sps = samples * info.world_size / dt
                mfu = self.flops_per_sample * sps / (peak * info.world_size)
                bar.update(1)
                if self.state.step % tc.log_every_steps == 0 or bar.n == bar.total:
                    extra = {"mfu": f"{100 * mfu:.1f}%"} if self.show_mfu and mfu <= 1 else {}
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{sps:.1f}", **extra)
            saved = None
            # Not after the epoch's last step: the epoch-end checkpoint follows at once.
            last = i + 1 == n_batches
            if tc.checkpoint_every_steps and self.state.step % tc.checkpoint_every_steps == 0 and not last:
                saved = self.save_checkpoint()
            if stop:
                # Honoured after the step completes: the checkpoint is then exactly the
                # state an uninterrupted run has at this step boundary (RNG included).
                path = saved or self.save_checkpoint()
                if bar:
                    bar.close()
                raise Preempted(self.state.step, signals.requested() or "a signal on another rank", path)
        if bar:
            bar.close()
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = merge_records(D.all_gather_objects(info, merge_records(parts)))
        m = self.task.metrics(rec) if info.is_main and rec else {}
        m = D.broadcast_object(info, m)
        self.state.epoch_records, self.state.epoch_seconds = [], 0.0
        sps = samples * info.world_size / dt
        m["samples_per_s"] = sps
        mfu = self.flops_per_sample * sps / (peak * info.world_size)
        if mfu > 1:  # the peak was measured at a busier moment: measure it again, keep the higher
            from trd_hpc.train.perf import remeasure

            self._peak = remeasure(self.device, self.precision)
            mfu = self.flops_per_sample * sps / (self._peak * info.world_size)
        m["mfu"] = mfu if mfu <= 1 else math.nan  # never a figure above the peak: none
        return m

    def fit(self, on_step=None, on_epoch=None) -> TrainState:
        tc, info = self.tc, self.info
        es_key, pl_key = tc.early_stopping.monitor, tc.plateau.monitor
        tie_key = tc.early_stopping.tie_breaker.metric if tc.early_stopping.tie_breaker else None
        while not self.state.finished and self.state.epoch < tc.max_epochs:
            epoch = self.state.epoch
            t0 = time.perf_counter()
            train_m = self.train_epoch(epoch, on_step)
            faults.point("epoch-end", epoch + 1, "before-bn")
            self.recompute_bn_stats()
            faults.point("epoch-end", epoch + 1, "before-val")
            val_m, _ = self.evaluate("val")
            row = {"epoch": epoch + 1, "step": self.state.step, "lr": self.plateau.lr}
            row.update({f"train.{k}": v for k, v in train_m.items()})
            row.update({f"val.{k}": v for k, v in val_m.items()})
            row["seconds"] = time.perf_counter() - t0
            # Decisions are taken once, on rank 0, from the gathered metrics.
            decision = None
            if info.is_main:
                is_best, stop = self.early.update(row.get(es_key, math.nan), epoch + 1, row.get(tie_key, math.nan))
                decision = {"is_best": is_best, "stop": stop, "plateau_value": row.get(pl_key, math.nan)}
            decision = D.broadcast_object(info, decision)
            if not info.is_main:
                # keep the same state everywhere
                self.early.update(row.get(es_key, math.nan), epoch + 1, row.get(tie_key, math.nan))
            self.plateau.step(decision["plateau_value"])
            if decision["is_best"]:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.raw_model.state_dict().items()}
            row["best_epoch"] = self.early.best_epoch
            self.state.history.append(row)
            self.state.epoch = epoch + 1
            self.train_sampler.set_epoch(epoch + 1)
            if decision["stop"]:
                self.state.stopped_early = True
                self.state.finished = True
            elif self.state.epoch >= tc.max_epochs:
                self.state.finished = True
            self._write_history()
            faults.point("epoch-end", epoch + 1, "before-save")
            self.save_checkpoint()
            if on_epoch is not None:
                on_epoch(self, row)
            if info.is_main:
                self._print_epoch(row)
        if tc.early_stopping.restore_best and self.best_state is not None:
            self.raw_model.load_state_dict(self.best_state)
        return self.state

    def _print_epoch(self, row: dict) -> None:
        keys = [
            k for k in row if k.startswith("val.") and k.split(".")[1] in ("loss", "auc", "accuracy", "severity_mae")
        ]
        parts = [f"epoch {row['epoch']}", f"train.loss {row.get('train.loss', math.nan):.4f}"]
        parts += [f"{k} {row[k]:.4f}" for k in keys]
        parts += [f"lr {row['lr']:.2e}", f"{row.get('train.samples_per_s', 0):.1f} samples/s"]
        if self.show_mfu:
            mfu = row.get("train.mfu", math.nan)
            parts.append(f"MFU {100 * mfu:.1f}%" if mfu == mfu else "MFU n/a (above this process's measured peak)")
        say("  ".join(parts))
