"""A third task, added through the registry alone (used by tests/test_experiment.py).

Logistic regression on the clinical variables of an EMT cohort: its own config class, its
own model and Task, its own registry entry, and nothing changed anywhere in trd_hpc.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trd_hpc.config import (
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    PlateauConfig,
    Strict,
    TrackingConfig,
    TrainConfig,
)
from trd_hpc.tasks import TaskSpec
from trd_hpc.tasks.base import check_finite, param_flops_estimate
from trd_hpc.tasks.emt.config import EMTCohortConfig


class ToyModelConfig(Strict):
    name: Literal["logistic"] = "logistic"


class ToyExperiment(Strict):
    task: Literal["toy_clinical"] = "toy_clinical"
    cohort: EMTCohortConfig = Field(default_factory=EMTCohortConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ToyModelConfig = Field(default_factory=ToyModelConfig)
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            lr=0.05,
            plateau=PlateauConfig(monitor="val.loss", mode="min"),
            early_stopping=EarlyStoppingConfig(monitor="val.loss", mode="min", patience=5),
        )
    )
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(calibration=[], baselines=[]))
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(wandb=False))


class Logistic(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.linear = nn.Linear(n, 1)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        return self.linear(clinical).squeeze(-1)


class ToyTask:
    name = "toy_clinical"
    input_names = ("clinical",)

    def __init__(self, cfg: ToyExperiment, cohort_root: str = ""):
        self.cfg, self.root = cfg, cohort_root

    def build_model(self) -> nn.Module:
        return Logistic(len(self.cfg.cohort.clinical.names))

    def flops_per_sample(self, model: nn.Module) -> int:
        return param_flops_estimate(model)

    def inputs(self, batch, device, dtype):
        x = batch["clinical"].to(device).to(dtype)
        check_finite("clinical", x, batch, self.root)
        return {"clinical": x}

    def loss(self, out, batch, device):
        return F.binary_cross_entropy_with_logits(out.float(), batch["label"].to(device).float()), {}

    def records(self, out, batch):
        return {
            "subject_id": batch["subject_id"].numpy(),
            "is_pad": batch["is_pad"].numpy(),
            "logit": out.detach().float().cpu().numpy(),
            "label": batch["label"].numpy(),
        }

    def metrics(self, rec):
        logit, y = torch.from_numpy(rec["logit"]).double(), torch.from_numpy(rec["label"]).double()
        return {
            "loss": float(F.binary_cross_entropy_with_logits(logit, y)),
            "accuracy": float(np.mean((rec["logit"] > 0) == rec["label"].astype(bool))),
        }


SPEC = TaskSpec(
    name="toy_clinical",
    config_class=ToyExperiment,
    make_task=ToyTask,
    title="Toy: TRD from clinical variables alone",
    summary_keys=("test.accuracy", "best_epoch"),
    curves=("val.loss", "val.accuracy"),
)
