"""Paper 001: the dual-path 3-D CNN predicts medication response (3 classes, focal loss)
and severity (regression) from a 3-D volume; baselines: two single-task CNNs and a 3-D
ResNet-18 with the same two heads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trd_hpc.tasks.base import Baseline, TaskSpec, check_finite
from trd_hpc.tasks.cnn3d.config import CNN3DExperiment

# What each model predicts; a single-task model is scored on its own target only.
_TARGETS = {"single_task_response": ("response",), "single_task_severity": ("severity",)}


class CNN3DTask:
    name = "cnn3d"
    input_names = ("volume",)

    def __init__(self, cfg: CNN3DExperiment, cohort_root: str = ""):
        self.cfg = cfg
        self.root = cohort_root
        self.targets = _TARGETS.get(cfg.model.name, ("response", "severity"))
        self._loss = None

    def build_model(self) -> nn.Module:
        from trd_hpc.tasks.cnn3d.model import build_cnn3d_model

        return build_cnn3d_model(self.cfg)

    def _loss_fn(self):
        if self._loss is None:
            from trd_hpc.tasks.cnn3d.losses import MultiTaskLoss

            self._loss = MultiTaskLoss(self.cfg.loss, tasks=self.targets)
        return self._loss

    def flops_per_sample(self, model: nn.Module) -> int:
        from trd_hpc.tasks.cnn3d.model import cnn3d_flops_per_sample

        return int(cnn3d_flops_per_sample(model, tuple(self.cfg.cohort.shape)))

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        v = batch["volume"].to(device, non_blocking=True).to(dtype)
        check_finite("volume", v, batch, self.root)
        return {"volume": v}

    def loss(self, out: dict, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        total, parts = self._loss_fn()(
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
        with torch.no_grad():
            total, parts = self._loss_fn()(
                {
                    "response_logits": torch.from_numpy(rec["response_logits"]),
                    "severity": torch.from_numpy(rec["severity_pred"]),
                },
                torch.from_numpy(rec["response"]).long(),
                torch.from_numpy(rec["severity"]).float(),
            )
        scale = float(self.cfg.cohort.severity_max)
        pred = rec["response_logits"].argmax(1)
        m = {
            "loss": float(total),
            "accuracy": float((pred == rec["response"]).mean()) if len(pred) else math.nan,
            "severity_mae": float(np.abs(rec["severity_pred"] - rec["severity"]).mean() * scale)
            if len(pred)
            else math.nan,
        }
        m.update({k: float(v) for k, v in parts.items()})
        if "response" not in self.targets:
            m.pop("accuracy")
            m.pop("loss.response", None)
        if "severity" not in self.targets:
            m.pop("severity_mae")
            m.pop("loss.severity", None)
        return m


def evaluate(cfg, run, model, history, preds, figures):
    from trd_hpc.tasks.cnn3d.evaluate import evaluate_cnn3d

    return evaluate_cnn3d(cfg, run, history, preds, figures)


def report(cfg, run, metrics):
    from trd_hpc.tasks.cnn3d.evaluate import report_parts

    return report_parts(cfg, run, metrics)


def prediction_columns(bundle, out, batch) -> dict:
    """One probability per class, the predicted class and the severity on the original
    scale (what the model predicts of them), plus the true values for a labelled cohort."""
    cfg = bundle.cfg
    names = list(bundle.schema["class_names"])
    cols: dict = {}
    targets = _TARGETS.get(cfg.model.name, ("response", "severity"))
    if "response" in targets:
        p = torch.softmax(out["response_logits"].detach().double(), dim=1).cpu().numpy()
        cols.update({f"p_{n}": p[:, k] for k, n in enumerate(names)})
        cols["predicted_class"] = np.array([names[k] for k in p.argmax(1)], dtype=object)
    if "severity" in targets:
        cols["severity"] = out["severity"].detach().double().cpu().numpy() * float(cfg.cohort.severity_max)
    y = batch["response"].numpy()
    if (y >= 0).all():
        cols["response"] = np.array([names[k] for k in y], dtype=object)
        cols["severity_true"] = batch["severity"].double().numpy() * float(cfg.cohort.severity_max)
    return cols


def explain(bundle, model, inputs: dict) -> list[tuple[dict, dict]]:
    """Grad-CAM per head (explain.py beside this file): one map each for response and severity."""
    from trd_hpc.tasks.cnn3d.explain import cnn_maps

    heads = _TARGETS.get(bundle.cfg.model.name, ("response", "severity"))
    maps = cnn_maps(model, inputs["volume"], heads)
    out = []
    for i in range(inputs["volume"].shape[0]):
        vols = {f"gradcam_{h}": maps[h][i] for h in heads}
        peak = {
            f"peak_{h}_voxel": "x".join(map(str, np.unravel_index(int(np.argmax(m)), m.shape)))
            for h, m in ((h, maps[h][i]) for h in heads)
        }
        out.append((vols, peak))
    return out


def reproduce(out: Path, scale: str):
    from trd_hpc.tasks.cnn3d.reproduce import recipe

    return recipe(out, scale)


def bootstrap_statistics(cfg, test: dict) -> tuple[dict, tuple]:
    """Response accuracy and severity MAE (on the cohort's scale), each only for a model that
    predicts it."""
    scale = float(cfg.cohort.severity_max)  # both stored on the [0, 1] scale the loss saw
    arrays = (
        np.asarray(test["response"]),
        np.asarray(test["response_logits"]).argmax(1),
        np.asarray(test["severity"], dtype=np.float64) * scale,
        np.asarray(test["severity_pred"], dtype=np.float64) * scale,
    )
    stats = {}
    if cfg.model.name != "single_task_severity":
        stats["accuracy"] = lambda r, rp, s, sp: float((r == rp).mean())
    if cfg.model.name != "single_task_response":
        stats["severity_mae"] = lambda r, rp, s, sp: float(np.abs(s - sp).mean())
    return stats, arrays


def example_inputs(schema: dict, batch: int, g: torch.Generator) -> dict:
    """A volume in [0, 1] with its channel axis, as the loader gives it."""
    (col,) = schema["inputs"]
    return {col["name"]: torch.rand((batch, *col["shape"]), generator=g).unsqueeze(1)}


SPEC = TaskSpec(
    name="cnn3d",
    config_class=CNN3DExperiment,
    make_task=CNN3DTask,
    title="Dual-path 3-D CNN: response and severity",
    baselines={
        "single_task_response": Baseline(overrides={"model.name": "single_task_response"}, scored_on=("accuracy",)),
        "single_task_severity": Baseline(overrides={"model.name": "single_task_severity"}, scored_on=("severity_mae",)),
        "resnet18": Baseline(overrides={"model.name": "resnet18"}, scored_on=("accuracy", "severity_mae")),
    },
    evaluate=evaluate,
    report=report,
    summary_keys=("test.accuracy", "test.severity_mae", "best_epoch"),
    curves=("val.loss", "val.accuracy", "val.severity_mae"),
    cv_keys=("test.accuracy", "test.severity_mae", "test.macro_f1", "best_epoch", "epochs_run"),
    prediction_columns=prediction_columns,
    explain=explain,
    bootstrap_statistics=bootstrap_statistics,
    example_inputs=example_inputs,
    paper="paper001",
    reproduce=reproduce,
)
