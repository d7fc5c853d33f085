"""What differs between the two papers' training, behind one small interface.

A task builds its model, turns a loader batch into model inputs, computes the
loss, turns outputs into per-subject records (numpy, gathered across ranks),
and computes metrics from gathered records.  The trainer knows nothing else
about EMT or the 3-D CNN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trd_hpc.config import CNN3DExperiment, EMTExperiment
from trd_hpc.errors import CohortError


class NonFiniteInput(CohortError, ValueError):
    """A subject's input holds NaN or inf."""


def _check_finite(name: str, t: torch.Tensor, batch: dict, root: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1)
        ids = batch["subject_id"][bad.cpu()].tolist()
        raise NonFiniteInput(
            f"input '{name}' holds NaN or inf for subject(s) {ids} of cohort {root}; "
            f"check it with `trd-hpc cohort validate {root}`"
        )


def param_flops_estimate(model: nn.Module) -> int:
    """~6 FLOPs per parameter per sample (2 forward, 4 backward) for dense layers."""
    return 6 * sum(p.numel() for p in model.parameters())


class EMTTask:
    name = "emt"
    input_names = ("fmri", "snp", "clinical")

    def __init__(self, cfg: EMTExperiment, cohort_root: str = ""):
        self.cfg = cfg
        self.root = cohort_root

    def build_model(self) -> nn.Module:
        from trd_hpc.models.baselines import build_emt_model

        return build_emt_model(self.cfg)

    def flops_per_sample(self, model: nn.Module) -> int:
        if self.cfg.model.name == "emt":
            from trd_hpc.models.emt import emt_flops_per_sample

            c = self.cfg.cohort
            return int(emt_flops_per_sample(self.cfg.model, tuple(c.fmri.shape), c.snp.n_snps, len(c.clinical.names)))
        return param_flops_estimate(model)

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        fmri = batch["fmri"].to(device, non_blocking=True).to(dtype)
        clinical = batch["clinical"].to(device, non_blocking=True).to(dtype)
        _check_finite("fmri", fmri, batch, self.root)
        _check_finite("clinical", clinical, batch, self.root)
        return {"fmri": fmri, "snp": batch["snp"].to(device, non_blocking=True), "clinical": clinical}

    def loss(self, out: torch.Tensor, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        y = batch["label"].to(device).float()
        loss = F.binary_cross_entropy_with_logits(out.float(), y)
        return loss, {}

    def records(self, out: torch.Tensor, batch: dict) -> dict[str, np.ndarray]:
        return {
            "subject_id": batch["subject_id"].numpy(),
            "is_pad": batch["is_pad"].numpy(),
            "logit": out.detach().float().cpu().numpy(),
            "label": batch["label"].numpy(),
        }

    def metrics(self, rec: dict[str, np.ndarray]) -> dict[str, float]:
        from trd_hpc.eval.metrics import binary_metrics

        logit = torch.from_numpy(rec["logit"]).double()
        y = torch.from_numpy(rec["label"]).double()
        prob = torch.sigmoid(logit).numpy()
        m = {"loss": float(F.binary_cross_entropy_with_logits(logit, y))}
        bm = binary_metrics(rec["label"], prob)
        m.update({k: float(bm[k]) for k in ("accuracy", "f1", "auc", "ap") if k in bm})
        return m


class CNN3DTask:
    name = "cnn3d"
    input_names = ("volume",)

    def __init__(self, cfg: CNN3DExperiment, cohort_root: str = ""):
        self.cfg = cfg
        self.root = cohort_root
        self._loss = None

    def build_model(self) -> nn.Module:
        from trd_hpc.models.cnn3d import build_cnn3d_model

        return build_cnn3d_model(self.cfg)

    def _loss_fn(self, model: nn.Module | None = None):
        if self._loss is None:
            from trd_hpc.models.losses import MultiTaskLoss

            tasks = getattr(model, "tasks", ("response", "severity")) if model is not None else self._tasks()
            self._loss = MultiTaskLoss(self.cfg.loss, tasks=tasks)
        return self._loss

    def _tasks(self) -> tuple[str, ...]:
        return {
            "single_task_response": ("response",),
            "single_task_severity": ("severity",),
        }.get(self.cfg.model.name, ("response", "severity"))

    def flops_per_sample(self, model: nn.Module) -> int:
        from trd_hpc.models.cnn3d import cnn3d_flops_per_sample

        return int(cnn3d_flops_per_sample(model, tuple(self.cfg.cohort.shape)))

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        v = batch["volume"].to(device, non_blocking=True).to(dtype)
        _check_finite("volume", v, batch, self.root)
        return {"volume": v}

    def loss(self, out: dict, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        fn = self._loss_fn()
        total, parts = fn(
            {"response_logits": out["response_logits"].float(), "severity": out["severity"].float()},
            batch["response"].to(device),
            batch["severity"].to(device).float(),
        )
        return total, {k: float(v) for k, v in parts.items()}

    def records(self, out: dict, batch: dict) -> dict[str, np.ndarray]:
        return {
            "subject_id": batch["subject_id"].numpy(),
            "is_pad": batch["is_pad"].numpy(),
            "response_logits": out["response_logits"].detach().float().cpu().numpy(),
            "severity_pred": out["severity"].detach().float().cpu().numpy(),
            "response": batch["response"].numpy(),
            "severity": batch["severity"].numpy(),
        }

    def metrics(self, rec: dict[str, np.ndarray]) -> dict[str, float]:
        fn = self._loss_fn()
        with torch.no_grad():
            total, parts = fn(
                {"response_logits": torch.from_numpy(rec["response_logits"]), "severity": torch.from_numpy(rec["severity_pred"])},
                torch.from_numpy(rec["response"]).long(),
                torch.from_numpy(rec["severity"]).float(),
            )
        scale = float(self.cfg.cohort.severity_max)
        pred = rec["response_logits"].argmax(1)
        m = {
            "loss": float(total),
            "accuracy": float((pred == rec["response"]).mean()) if len(pred) else math.nan,
            "severity_mae": float(np.abs(rec["severity_pred"] - rec["severity"]).mean() * scale) if len(pred) else math.nan,
        }
        m.update({k: float(v) for k, v in parts.items()})
        # single-task models: only the metrics of the target they predict
        tasks = self._tasks()
        if "response" not in tasks:
            m.pop("accuracy")
            m.pop("loss.response", None)
        if "severity" not in tasks:
            m.pop("severity_mae")
            m.pop("loss.severity", None)
        return m


def make_task(cfg, cohort_root: str = ""):
    if isinstance(cfg, EMTExperiment):
        return EMTTask(cfg, cohort_root)
    if isinstance(cfg, CNN3DExperiment):
        return CNN3DTask(cfg, cohort_root)
    raise TypeError(f"no task for {type(cfg).__name__}")


def merge_records(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate records from batches/ranks, drop padding and repeated subjects,
    and sort by subject id (so metrics are over the whole split, each subject once)."""
    parts = [p for p in parts if p and len(p["subject_id"])]
    if not parts:
        return {}
    rec = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = ~rec["is_pad"].astype(bool)
    rec = {k: v[keep] for k, v in rec.items()}
    _, first = np.unique(rec["subject_id"], return_index=True)
    return {k: v[first] for k, v in rec.items()}
