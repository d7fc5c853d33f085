"""Paper 001's config classes: the synthetic volume cohort, the ingested one, the dual-path
CNN and its baselines, the multi-task loss, the experiment (``task: cnn3d``).  Registered by
name through ``trd_hpc.config`` (EXPERIMENT, COHORTS, INGEST_SPEC at the bottom)."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, model_validator

from trd_hpc.cohort_config import IngestSpecBase, Resolved, cohort_kind, split_error, stratified_problem
from trd_hpc.config import deep_merge
from trd_hpc.sections import (
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    PlateauConfig,
    PosInt,
    Strict,
    TieBreaker,
    TrackingConfig,
    TrainConfig,
    default_baselines,
)

BASELINES = ("single_task_response", "single_task_severity", "resnet18")


def volume_split_problem(n: int, split: "VolumeSplit") -> str | None:
    # Classes are drawn per subject, so only the sizes are checked here (3 classes).
    why, _ = stratified_problem(n, split.test, "the test part", None, 3)
    if why:
        return why
    why, _ = stratified_problem(n - math.ceil(split.test * n), split.val, "the val part", None, 3)
    if why:
        return why
    if split.folds > n:
        return f"{split.folds} folds need at least {split.folds} subjects"
    rest = n - math.ceil(n / split.folds)  # the training side of the largest fold
    why, _ = stratified_problem(rest, split.val, "the val part of a cross-validation fold", None, 3)
    return why


# --------------------------------------------------------------------------- volume cohort
class AffineConfig(Strict):
    rotation_deg: float = Field(5.0, ge=0)
    scale: float = Field(0.05, ge=0, lt=1)
    translation_vox: float = Field(2.0, ge=0)


class WarpConfig(Strict):
    """Gaussian random-field warp: white noise smoothed by a Gaussian of
    ``smoothness_vox`` and scaled so its sd is ``amplitude_vox`` voxels."""

    amplitude_vox: float = Field(1.0, ge=0)
    smoothness_vox: float = Field(6.0, gt=0)


class SeverityEffects(Strict):
    """How far the prefrontal and hippocampal structures change at severity 1.0
    (the top of the scale): fractional intensity loss and fractional shrinkage."""

    prefrontal_intensity_loss: float = Field(0.5, ge=0, le=1)
    prefrontal_shrink: float = Field(0.3, ge=0, lt=1)
    hippocampus_intensity_loss: float = Field(0.5, ge=0, le=1)
    hippocampus_shrink: float = Field(0.4, ge=0, lt=1)


class VolumeSplit(Strict):
    test: float = Field(0.15, gt=0, lt=1)
    # Held out of the training part for early stopping / LR plateau.
    val: float = Field(0.15, gt=0, lt=1)
    folds: int = Field(5, ge=2)


class VolumeCohortConfig(Strict):
    kind: Literal["volume"] = "volume"
    n_subjects: int = Field(1500, ge=6)
    seed: int = 42
    subjects_per_shard: int = Field(256, ge=1)
    shape: tuple[PosInt, PosInt, PosInt] = (64, 64, 16)
    class_names: tuple[str, str, str] = ("non_responder", "partial_responder", "responder")
    class_probs: tuple[float, float, float] = (0.25, 0.50, 0.25)
    # Severity is uniform inside each class's range on a 0..severity_max scale.
    # Contiguous ranges: a model that only knows the class scores MAE = width/4.
    severity_max: float = Field(100.0, gt=0)
    severity_ranges: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = (
        (66.7, 100.0),
        (33.3, 66.7),
        (0.0, 33.3),
    )
    noise_sd: float = Field(0.01, ge=0)
    intensity_shift: float = Field(0.05, ge=0, lt=1)
    affine: AffineConfig = Field(default_factory=AffineConfig)
    warp: WarpConfig = Field(default_factory=WarpConfig)
    effects: SeverityEffects = Field(default_factory=SeverityEffects)
    split: VolumeSplit = Field(default_factory=VolumeSplit)
    # Volumes are stored raw (float32); z-score then [0, 1] rescaling is applied
    # per volume by the loader (data.normalize_volumes), so other tools see the
    # generated intensities.
    stored_normalization: Literal["none"] = "none"

    @property
    def labelled(self) -> bool:
        return True

    @model_validator(mode="after")
    def _check(self) -> "VolumeCohortConfig":
        p = self.class_probs
        if any(x <= 0 for x in p) or abs(sum(p) - 1) > 1e-6:
            raise ValueError(f"class_probs must be 3 positive numbers summing to 1, got {p}")
        for k, (lo, hi) in enumerate(self.severity_ranges):
            if not 0 <= lo < hi <= self.severity_max:
                raise ValueError(f"severity_ranges[{k}] = ({lo}, {hi}) must lie inside 0..{self.severity_max}")
        err = split_error(self.n_subjects, self.split, volume_split_problem)
        if err:
            raise ValueError(err)
        return self


class CNN3DIngestSpec(IngestSpecBase):
    task: Literal["cnn3d"] = "cnn3d"
    cohort_kind: ClassVar[str] = "ingested_volume"  # what it resolves to (its IngestMapping)
    response_column: Optional[str] = None  # None: an unlabelled cohort (prediction only)
    severity_column: Optional[str] = None
    # Severity is scaled by this for the loss (paper 001: a 0-100 scale); None: the largest
    # severity in the table.
    severity_max: Optional[float] = Field(None, gt=0)
    class_names: tuple[str, str, str] = ("non_responder", "partial_responder", "responder")
    volume: str  # path template with {id}: one 3-D image per subject
    grid: tuple[PosInt, PosInt, PosInt] = (64, 64, 16)
    split: VolumeSplit = Field(default_factory=VolumeSplit)

    @model_validator(mode="after")
    def _pair(self) -> "CNN3DIngestSpec":
        if (self.response_column is None) != (self.severity_column is None):
            raise ValueError("give both response_column and severity_column (or neither, for an unlabelled cohort)")
        if self.labels is not None and len(self.labels) != 3:
            raise ValueError(f"labels must name the 3 values of response_column in class order, got {self.labels}")
        return self


class IngestedVolumeCohort(CNN3DIngestSpec):
    kind: Literal["ingested_volume"] = "ingested_volume"
    resolved: Resolved
    severity_max: float = Field(gt=0)  # resolved: the spec's, or the table's largest severity

    @property
    def n_subjects(self) -> int:
        return self.resolved.n_subjects

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.grid)

    @property
    def labelled(self) -> bool:
        return self.response_column is not None


VolumeCohortSection = Annotated[
    Union[Annotated[VolumeCohortConfig, Tag("volume")], Annotated[IngestedVolumeCohort, Tag("ingested_volume")]],
    Discriminator(cohort_kind("volume")),
]


class CNN3DModelConfig(Strict):
    """Dual-path 3-D CNN (paper 001, section 2.3) and its baselines."""

    name: Literal["dual_path", "single_task_response", "single_task_severity", "resnet18"] = "dual_path"
    channels: tuple[PosInt, ...] = Field((16, 32, 64), min_length=1)  # one Conv3d-BN-ReLU-MaxPool block each (chosen)
    # How many of those blocks (the first ones) end in max-pooling; None: all of them.
    # Fewer keeps a finer grid for the paths' attention and pooling (paper 64x64x16 with
    # 2 of 3: 16x16x4 features instead of 8x8x2, at the same convolution cost).
    pooled_blocks: Optional[int] = Field(None, ge=0)
    attention: Literal["se", "spatial", "none"] = "se"  # per path: squeeze-excitation or spatial gate
    dropout: float = Field(0.3, ge=0, lt=1)
    dense: int = Field(64, ge=1)


class MultiTaskLossConfig(Strict):
    severity_weight: float = Field(0.4, ge=0)  # MSE on severity in [0, 1]
    response_weight: float = Field(0.6, ge=0)  # categorical focal loss
    focal_alpha: float = Field(0.25, gt=0)
    focal_gamma: float = Field(2.0, ge=0)


class CNN3DEvalConfig(EvalConfig):
    baselines: list[Literal[BASELINES]] = Field(default_factory=list)  # type: ignore[valid-type]


def _cnn_train() -> TrainConfig:
    return TrainConfig(
        optimizer="adam",
        lr=5e-4,
        weight_decay=0.0,
        grad_clip_norm=1.0,
        batch_size=16,
        max_epochs=39,
        precise_bn_batches=16,
        plateau=PlateauConfig(monitor="val.loss", mode="min", patience=3, factor=0.5),
        # Chosen tie-breaker: on ~190 validation volumes accuracy reaches its ceiling within a
        # few epochs and stays there; among the epochs at the ceiling the lowest validation loss
        # (which still falls, the severity error with it) is kept, and patience restarts.
        early_stopping=EarlyStoppingConfig(
            monitor="val.accuracy", mode="max", patience=7, tie_breaker=TieBreaker(metric="val.loss", mode="min")
        ),
    )


class CNN3DExperiment(Strict):
    task: Literal["cnn3d"] = "cnn3d"
    cohort: VolumeCohortSection = Field(default_factory=VolumeCohortConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: CNN3DModelConfig = Field(default_factory=CNN3DModelConfig)
    loss: MultiTaskLossConfig = Field(default_factory=MultiTaskLossConfig)
    train: TrainConfig = Field(default_factory=_cnn_train)
    eval: CNN3DEvalConfig = Field(default_factory=lambda: CNN3DEvalConfig(calibration=[], baselines=list(BASELINES)))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _baselines(cls, data: Any) -> Any:
        data = default_baselines(data, list(BASELINES))
        # A partial `train:` section overrides paper 001's training defaults key by key
        # (not the generic TrainConfig defaults, which are paper 000's).
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data = {**data, "train": deep_merge(_cnn_train().model_dump(), data["train"])}
        return data

    @model_validator(mode="after")
    def _single_task_monitors(self) -> "CNN3DExperiment":
        # A single-task baseline reports only its own target: the severity model has no
        # accuracy and the response model no severity MAE. Its plateau and early stopping
        # follow the metric of its own target, so the baseline made from the dual-path
        # config (early stopping on val.accuracy) stops on something it actually predicts.
        own = {
            "single_task_severity": ("val.severity_mae", "min"),
            "single_task_response": ("val.accuracy", "max"),
        }.get(self.model.name)
        if own is not None:
            foreign = "val.accuracy" if own[0] == "val.severity_mae" else "val.severity_mae"
            for section in (self.train.plateau, self.train.early_stopping):
                if section.monitor == foreign:
                    section.monitor, section.mode = own
        return self


EXPERIMENT = CNN3DExperiment
COHORTS = {"volume": VolumeCohortConfig, "ingested_volume": IngestedVolumeCohort}
INGEST_SPEC = CNN3DIngestSpec
