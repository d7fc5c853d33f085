"""What every task gives the trainer and the experiment layer.

A *task* is one kind of experiment: a config class, the model it builds, how a loader batch
becomes model inputs, the loss, the per-subject records kept from the outputs, and the
metrics computed from them.  The trainer knows tasks only through ``Task``; the experiment
layer (baselines, evaluation, report) only through ``TaskSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from trd_hpc.errors import CohortError


@runtime_checkable
class Task(Protocol):
    """The trainer's view of a task (built per run from the config and the cohort root)."""

    name: str
    input_names: tuple[str, ...]

    def build_model(self) -> nn.Module: ...

    def flops_per_sample(self, model: nn.Module) -> int: ...

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def loss(self, out: Any, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]: ...

    def records(self, out: Any, batch: dict) -> dict[str, np.ndarray]:
        """Per-subject numpy arrays; must hold ``subject_id`` and ``is_pad`` (see merge_records)."""
        ...

    def metrics(self, rec: dict[str, np.ndarray]) -> dict[str, float]: ...


@dataclass(frozen=True)
class Baseline:
    """A model the task's main model is compared with.

    Either a trainer baseline, the run's own config with ``overrides`` (dotted keys) applied
    and validated again, or anything else through ``fit(cfg, out_dir) -> metrics``, which
    writes ``out_dir/metrics.json`` and ``out_dir/predictions/test.npz`` like a run does.
    ``scored_on``: the test metrics copied into the main run's metrics.json as
    ``baselines.NAME.KEY``."""

    overrides: Mapping[str, Any] | None = None
    fit: Callable[[Any, Path], dict] | None = None
    scored_on: tuple[str, ...] = ("accuracy",)

    def __post_init__(self) -> None:
        if (self.overrides is None) == (self.fit is None):
            raise ValueError("a baseline has either overrides (trained by the trainer) or a fit function")


@dataclass(frozen=True)
class TaskSpec:
    """One registry entry: everything about a task the rest of trd-hpc may ask for.

    ``evaluate(cfg, run, model, history, preds, figures) -> (metrics, figures)`` adds the task's own evaluation
    (calibration, importance, figures) to a finished run; it reads the run directory and
    the baselines' outputs and trains nothing.  Without it a run's metrics are the test
    metrics the trainer computed."""

    name: str
    config_class: type
    make_task: Callable[[Any, str], Task]
    title: str
    baselines: Mapping[str, Baseline] = field(default_factory=dict)
    evaluate: Callable[..., tuple[dict, dict]] | None = None
    # (cfg, run, metrics) -> trd_hpc.eval.report.ReportParts: report.html's summary table and
    # sections, from the run's files alone (`trd-hpc report` calls it); None: metrics and figures
    report: Callable[[Any, Any, dict], Any] | None = None
    # Metrics printed after `trd-hpc train` and drawn by `trd-hpc compare`.
    summary_keys: tuple[str, ...] = ("test.loss",)
    curves: tuple[str, ...] = ("val.loss",)
    cv_keys: tuple[str, ...] = ("best_epoch", "epochs_run")
    # (bundle, model outputs, batch) -> the columns `trd-hpc predict` writes per subject
    prediction_columns: Callable[[Any, Any, dict], dict] | None = None
    # (bundle, model, model inputs of some subjects) -> per subject ({map name: 3-D array}, summary
    # columns): `trd-hpc predict --explain` (trd_hpc.explain)
    explain: Callable[[Any, Any, dict], list[tuple[dict, dict]]] | None = None
    # (cfg, test predictions) -> ({name: statistic(*arrays) -> float}, arrays over test subjects):
    # the bundle's bootstrap intervals (model_card.json); None: no intervals
    bootstrap_statistics: Callable[[Any, dict], tuple[dict, tuple]] | None = None
    # (bundle schema, batch, torch.Generator) -> model inputs in the ranges the model sees
    # (`trd-hpc export` traces and checks with them); None: example_inputs below
    example_inputs: Callable[[dict, int, torch.Generator], dict] | None = None
    # (bundle, cohort config) -> why the cohort's columns do not fit the model, beyond the
    # shapes `trd-hpc predict` checks itself (clinical names, SNP ids); None: nothing more
    cohort_mismatch: Callable[[Any, Any], list[str]] | None = None
    # `trd-hpc reproduce PAPER`: the paper's id and (out dir, scale) -> trd_hpc.recipe.Recipe
    paper: str | None = None
    reproduce: Callable[[Path, str], Any] | None = None


# ---------------------------------------------------------------------------- shared helpers
class NonFiniteInput(CohortError, ValueError):
    """A subject's input holds NaN or inf."""


def check_finite(name: str, t: torch.Tensor, batch: dict, root: str) -> None:
    if not t.is_floating_point():
        return
    # One reduction instead of an element-wise mask: a NaN or inf anywhere makes the sum NaN or
    # inf, so a finite sum proves every element finite. (isfinite(t).all() cost 17 % of an EMT
    # step at the paper's shapes.) A non-finite sum of finite values (overflow) is cleared below.
    if torch.isfinite(t.sum()):
        return
    bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1)
    if bad.any():
        ids = batch["subject_id"][bad.cpu()].tolist()
        raise NonFiniteInput(
            f"input '{name}' holds NaN or inf for subject(s) {ids} of cohort {root}; "
            f"check it with `trd-hpc cohort validate {root}`"
        )


class FlopsEstimate(int):
    """A FLOP count estimated from the parameter count, not the model's own formula: the
    trainer records MFU from it but does not print it (it could mislead by a large factor)."""


def param_flops_estimate(model: nn.Module) -> int:
    """~6 FLOPs per parameter per sample (2 forward, 4 backward) for dense layers."""
    return FlopsEstimate(6 * sum(p.numel() for p in model.parameters()))


def example_inputs(schema: dict, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs of a bundle's schema: uint8 columns drawn below their ``high`` (flags), else below
    ``genotype_values`` (genotypes, as a cohort stores them); float columns standard normal."""
    out = {}
    for col in schema["inputs"]:
        shape = (batch, *col["shape"])
        if col["dtype"] == "uint8":
            hi = int(col.get("high") or schema.get("genotype_values", 3))
            out[col["name"]] = torch.randint(0, hi, shape, generator=g, dtype=torch.uint8)
        else:
            out[col["name"]] = torch.randn(shape, generator=g)
    return out


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
