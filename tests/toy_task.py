"""A third task, added through the registry alone (tests/test_experiment.py, tests/test_toy_paper.py).

Logistic regression on the clinical variables of an EMT cohort, with everything a paper of
trd-hpc has: its own config class, model and Task, two baselines (one trained by the trainer,
one fitted by scikit-learn), bootstrap intervals in its bundle, prediction columns for
`trd-hpc predict`, inputs for `trd-hpc export` (the generic ones) and a reproduction recipe
(`trd-hpc reproduce toy000`), and nothing changed anywhere in trd_hpc.  Importing the module
registers it: name it in $TRD_HPC_PLUGINS and every trd-hpc process finds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trd_hpc import tasks
from trd_hpc.sections import (
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    PlateauConfig,
    Strict,
    TrackingConfig,
    TrainConfig,
)
from trd_hpc.tasks import Baseline, TaskSpec
from trd_hpc.tasks.base import check_finite, param_flops_estimate
from trd_hpc.tasks.emt.config import EMTCohortConfig

BASELINES = ("bias_only", "sklearn_logistic")
TINY = Path(__file__).with_name("toy_tiny.yaml")


class ToyModelConfig(Strict):
    name: Literal["logistic", "bias_only"] = "logistic"


class ToyEvalConfig(EvalConfig):
    baselines: list[Literal[BASELINES]] = Field(default_factory=list)


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
    eval: ToyEvalConfig = Field(default_factory=lambda: ToyEvalConfig(calibration=[], baselines=[]))
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(wandb=False))


class Logistic(nn.Module):
    def __init__(self, n: int, bias_only: bool = False):
        super().__init__()
        self.linear = nn.Linear(n, 1)
        self.bias_only = bias_only  # the baseline: the class balance, no input

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(clinical) if self.bias_only else clinical
        return self.linear(x).squeeze(-1)


class ToyTask:
    name = "toy_clinical"
    input_names = ("clinical",)

    def __init__(self, cfg: ToyExperiment, cohort_root: str = ""):
        self.cfg, self.root = cfg, cohort_root

    def build_model(self) -> nn.Module:
        return Logistic(len(self.cfg.cohort.clinical.names), bias_only=self.cfg.model.name == "bias_only")

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


def fit_sklearn_logistic(cfg: ToyExperiment, out_dir: Path) -> dict:
    """scikit-learn's logistic regression on the same clinical values; a run-like directory."""
    from sklearn.linear_model import LogisticRegression

    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.rundir import RunDir

    def split(role: str):
        ds = CohortDataset(cfg.data.cohort, cfg.data.split(role))
        b = ds.__getitems__(list(range(len(ds))))
        ds.close()
        return b["clinical"].numpy(), b["label"].numpy(), b["subject_id"].numpy()

    xtr, ytr, _ = split("train")
    xte, yte, ids = split("test")
    prob = LogisticRegression().fit(xtr, ytr).predict_proba(xte)[:, 1]
    run = RunDir(out_dir)
    run.write_predictions("test", {"subject_id": ids, "label": yte, "prob": prob})
    return run.write_metrics({"test.accuracy": float(np.mean((prob >= 0.5) == (yte == 1)))})


def prediction_columns(bundle, out, batch) -> dict:
    p = torch.sigmoid(out.detach().double()).cpu().numpy()
    cols = {"p_trd": p, "predicted_label": (p >= 0.5).astype(np.int64)}
    y = batch["label"].numpy()
    if (y >= 0).all():
        cols["label"] = y
    return cols


def bootstrap_statistics(cfg, test: dict) -> tuple[dict, tuple]:
    return {"accuracy": lambda y, z: float(np.mean((z > 0) == (y == 1)))}, (
        np.asarray(test["label"]),
        np.asarray(test["logit"]),
    )


def recipe(out: Path, scale: str):
    from trd_hpc.recipe import Recipe, Row, Stage, fmt

    data, main = str(out / "data"), str(out / "main")
    m = "main/metrics.json"
    stages = (
        Stage("generate", ("generate", str(TINY), "--out", data), ("data/manifest.json",)),
        Stage("train", ("train", str(TINY), "--out", main, "--no-eval", f"data.cohort={data}"), (m,)),
        Stage("evaluate", ("evaluate", main, f"eval.baselines=[{','.join(BASELINES)}]"), ("main/bundle",)),
    )
    rows = (
        Row("accuracy", "-", lambda s: fmt(s.get(m, "test.accuracy"))),
        *(Row(f"{b} accuracy", "-", lambda s, b=b: fmt(s.get(m, f"baselines.{b}.accuracy"))) for b in BASELINES),
    )
    return Recipe("toy000", "Toy (clinical variables alone)", stages, lambda s: "test set", rows)


SPEC = TaskSpec(
    name="toy_clinical",
    config_class=ToyExperiment,
    make_task=ToyTask,
    title="Toy: TRD from clinical variables alone",
    baselines={
        "bias_only": Baseline(overrides={"model.name": "bias_only"}, scored_on=("accuracy",)),
        "sklearn_logistic": Baseline(fit=fit_sklearn_logistic, scored_on=("accuracy",)),
    },
    summary_keys=("test.accuracy", "best_epoch"),
    curves=("val.loss", "val.accuracy"),
    prediction_columns=prediction_columns,
    bootstrap_statistics=bootstrap_statistics,
    paper="toy000",
    reproduce=recipe,
)
tasks.register(SPEC)
