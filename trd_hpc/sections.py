"""The config sections every task shares: ``data``, ``train`` (with early stopping and the
plateau schedule), ``eval``, ``tracking``, and the strict base class of every config section.
Each paper's config class (``trd_hpc/tasks/<paper>/config.py``) adds its own ``cohort`` and
``model`` sections and may subclass these (its ``EvalConfig`` names its baselines)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    # inf / nan pass every ge/gt bound that matters (lr=inf, noise_sd=inf) and poison a
    # run or a cohort only much later, so no float anywhere in a config may be non-finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


PosInt = Annotated[int, Field(ge=1)]


Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------- data loading
class DataConfig(Strict):
    # Cohort directory.  It must exist (made by `trd-hpc generate` or `trd-hpc ingest`)
    # unless `generate` is set: a mistyped path is an error, never a synthetic cohort made
    # there and trained on in place of the real one.
    cohort: str = "data/cohort"
    # Make the cohort from the cohort section when data.cohort does not exist yet
    # (`--generate` on train/cv/tune).  Never over an existing directory's files.
    generate: bool = False
    num_workers: int = Field(2, ge=0)
    # "thread": the workers are threads of the training process reading ahead into reused
    # buffers (no shared-memory hand-over; reads overlap the step's compute); "process": torch
    # DataLoader worker processes, for CPU-heavy per-item work. See `trd-hpc bench load`.
    worker_type: Literal["thread", "process"] = "thread"
    prefetch_factor: int = Field(2, ge=1)
    # Subjects per contiguous run the sampler keeps together inside a shard.
    locality_block: int = Field(16, ge=1)
    normalize_volumes: bool = True
    # Where subjects come from when `train` makes the cohort: "shards" writes them to HDF5;
    # "virtual" writes only the manifest and splits, and the loader regenerates subject i
    # from (seed, i) when it reads it (no disk: a 100k-subject EMT cohort would be 885 GB).
    # A cohort directory that exists is read as it is, whichever it holds.
    source: Literal["shards", "virtual"] = "shards"
    # Train on cross-validation fold K of the cohort (test = fold K, train/val from the
    # other folds) instead of its train/val/test split.  Set by `trd-hpc cv`.
    fold: Optional[int] = Field(None, ge=0)
    # Complete-case training: leave out of the train and val splits every subject that lacks
    # one of these modalities (its `present` flag 0; the EMT's: fmri, genotypes, clinical), e.g.
    # [genotypes]. The test split is never filtered, so a run with and one without it are
    # scored on the same subjects ([]: keep them all, an absent modality as its missing token).
    complete_cases: list[str] = Field(default_factory=list)

    def split(self, role: str) -> str:
        """The cohort split that plays ``role`` (train | val | test) for this run."""
        return role if self.fold is None else f"fold:{self.fold}:{role}"

    def complete(self, role: str) -> tuple[str, ...]:
        """The modalities a subject of ``role``'s split must have to be read (complete_cases:
        train and val only)."""
        return tuple(self.complete_cases) if role in ("train", "val") else ()


# --------------------------------------------------------------------------- training
class PlateauConfig(Strict):
    monitor: str = "val.auc"
    mode: Literal["min", "max"] = "max"
    patience: int = Field(3, ge=0)
    factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(0.0, ge=0)


class TieBreaker(Strict):
    """A second per-epoch metric that orders epochs (early stopping) or trials (sweeps)
    whose monitored metric is exactly equal: accuracy on a validation set of a few hundred
    subjects takes few distinct values, and once it reaches its ceiling every later epoch
    ties with the first one there."""

    metric: str
    mode: Literal["max", "min"]

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not (v.startswith("val.") or v.startswith("train.")):
            raise ValueError(f"must be a per-epoch metric starting with 'val.' or 'train.', got {v!r}")
        return v


class EarlyStoppingConfig(Strict):
    monitor: str = "val.auc"
    mode: Literal["min", "max"] = "max"
    patience: int = Field(7, ge=1)
    restore_best: bool = True
    # None: an epoch is better only when `monitor` strictly improves (Keras' rule). Set: an
    # epoch that equals the best `monitor` and improves the tie-breaker is a new best too
    # (its weights are kept and patience restarts).
    tie_breaker: Optional[TieBreaker] = None


class TrainConfig(Strict):
    strategy: Literal["single", "ddp", "deepspeed"] = "single"
    # auto: bf16 on a GPU that supports it, fp32 on CPU (no bf16 units on most CPUs)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(12, ge=1)  # per process and micro-batch
    # Micro-batches per optimiser step: the global batch is batch_size x processes x this.
    # W processes accumulating A give bit for bit what W*A processes give (A a power of two).
    grad_accum_steps: int = Field(1, ge=1)
    max_epochs: int = Field(50, ge=1)
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip_norm: Optional[float] = Field(None, gt=0)
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: at epoch ends (and on signals) only
    # Write RUN/ledger/: every trained sample's (epoch, step, subject id, padding) per rank and
    # attempt, to audit what a run saw (an elastic resume trains on each subject once an epoch)
    ledger: bool = False
    seed: int = 0
    deterministic: bool = True  # CPU runs are bit-reproducible, also across resume
    deepspeed_config: Optional[str] = None  # a JSON in configs/deepspeed/; optimiser/LR filled from here
    compile: bool = False  # torch.compile the model
    log_every_steps: int = Field(10, ge=1)
    num_threads: int = Field(0, ge=0)  # torch intra-op threads per process (0: cores / local processes)
    # Before each validation, re-estimate BatchNorm running statistics from this many
    # training batches at the current weights (0: off).  Running averages taken while
    # the weights move fast lag behind them and make eval-mode predictions swing.
    precise_bn_batches: int = Field(0, ge=0)


class EvalConfig(Strict):
    calibration: list[Literal["platt", "isotonic", "temperature"]] = Field(
        default_factory=lambda: ["platt", "isotonic", "temperature"]
    )
    ece_bins: int = Field(10, ge=2)
    # Names of the task's baselines (each task's EvalConfig subclass says which exist).
    baselines: list[str] = Field(default_factory=list)
    # The calibrator `trd-hpc predict` applies by default (binary tasks): auto = the lowest
    # out-of-fold ECE on the validation split (eval.calibration.choose_calibrator).
    default_calibrator: Literal["auto", "platt", "isotonic", "temperature", "none"] = "auto"


class TrackingConfig(Strict):
    wandb: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE set by the user wins
    project: str = "trd-hpc"
    group: Optional[str] = None
    job_type: str = "train"
    tags: list[str] = Field(default_factory=list)
    csv: bool = False  # also RUN_DIR/metrics.csv, one row per epoch, W&B on or off (trd_hpc.tracking)
    # also MLflow: parameters, metrics, figures in RUN_DIR/mlflow.db (SQLite, no server) or
    # the store mlflow_uri names (sqlite:///FILE shared by runs, or an http(s) tracking server)
    mlflow: bool = False
    mlflow_uri: Optional[str] = None


def default_baselines(data: Any, names: list[str]) -> Any:
    """Each task's baselines unless the config lists its own (an empty list turns them off)."""
    if isinstance(data, dict):
        ev = data.get("eval")
        if ev is None:
            data = {**data, "eval": {"baselines": names}}
        elif isinstance(ev, dict) and "baselines" not in ev:
            data = {**data, "eval": {**ev, "baselines": names}}
    return data
