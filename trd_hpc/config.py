"""Typed experiment configs: YAML files plus dotted ``key=value`` overrides.

YAML and overrides are merged with OmegaConf (which also parses the override
values: ``20000`` is an int, ``[1,2]`` a list, ``${cohort.seed}`` an
interpolation of another key); the merged tree is validated by pydantic models
that reject unknown keys and non-finite numbers.  Every error names the dotted
key and, for an unknown key, lists the valid ones at that level.

OmegaConf resolvers (``${oc.env:VAR}``, ``${oc.decode:...}``, any ``${name:...}``)
are refused: they read the environment, and the resolved value would end up in
the run's config.yaml, its W&B record and every log that prints the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from trd_hpc.errors import ConfigError  # noqa: E402  (re-exported: a config file or override is invalid)


class Strict(BaseModel):
    # inf / nan pass every ge/gt bound that matters (lr=inf, noise_sd=inf) and poison a
    # run or a cohort only much later, so no float anywhere in a config may be non-finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


PosInt = Annotated[int, Field(ge=1)]


Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------- EMT cohort
class RegionEffect(Strict):
    """A per-subject offset ~ N(offset_mean, offset_sd) added to every voxel and
    frame inside ``box`` (half-open [start, stop) per spatial axis) for subjects of
    class ``applies_to``.  A negative mean is a hypoactivation."""

    box: Box
    applies_to: Literal["trd", "non_trd"]
    offset_mean: float
    offset_sd: float = Field(ge=0)


def _default_regions() -> dict[str, RegionEffect]:
    # Boxes in the 48 x 48 x 24 grid (x: left->right, y: posterior->anterior,
    # z: inferior->superior).  The paper gives no coordinates; these sit where
    # the structures are in a roughly centred brain.
    return {
        "right_amygdala": RegionEffect(
            box=((30, 36), (22, 28), (6, 10)), applies_to="trd", offset_mean=0.5, offset_sd=0.1
        ),
        "dorsolateral_prefrontal": RegionEffect(
            box=((8, 16), (36, 44), (14, 20)), applies_to="trd", offset_mean=-0.4, offset_sd=0.1
        ),
        "anterior_cingulate": RegionEffect(
            box=((21, 27), (32, 38), (10, 16)), applies_to="non_trd", offset_mean=0.3, offset_sd=0.1
        ),
    }


class FMRIConfig(Strict):
    shape: tuple[PosInt, PosInt, PosInt, PosInt] = (48, 48, 24, 80)
    noise_sd: float = Field(0.08, ge=0)
    dtype: Literal["float16", "float32"] = "float16"


class SNPConfig(Strict):
    n_snps: int = Field(800, ge=1)
    n_predictive: int = Field(100, ge=0)
    probs_trd: tuple[float, float, float] = (0.40, 0.35, 0.25)
    probs_non_trd: tuple[float, float, float] = (0.80, 0.15, 0.05)
    # The paper does not say how the other 700 SNPs are drawn; one distribution
    # shared by both classes (so they carry no signal).
    probs_other: tuple[float, float, float] = (0.60, 0.30, 0.10)

    @model_validator(mode="after")
    def _check(self) -> "SNPConfig":
        for name in ("probs_trd", "probs_non_trd", "probs_other"):
            p = getattr(self, name)
            if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
                raise ValueError(f"{name} must be 3 non-negative probabilities summing to 1, got {p}")
        if self.n_predictive > self.n_snps:
            raise ValueError(f"n_predictive ({self.n_predictive}) exceeds n_snps ({self.n_snps})")
        return self


DEFAULT_CLINICAL = [
    "severity",
    "illness_duration",
    "episode_count",
    "functional_capacity",
    "anxiety_comorbidity",
    "age",
    "sleep_disturbance",
    "anhedonia",
    "suicidal_ideation",
    "prior_medication_trials",
    "bmi",
    "substance_use",
    "social_support",
    "cognitive_function",
    "childhood_adversity",
]


class ClinicalConfig(Strict):
    names: list[str] = Field(default_factory=lambda: list(DEFAULT_CLINICAL))
    sd: float = Field(0.8, ge=0)
    trd_shifts: dict[str, float] = Field(
        default_factory=lambda: {
            "severity": 2.0,
            "illness_duration": 1.5,
            "episode_count": 1.2,
            "functional_capacity": -1.5,
            "anxiety_comorbidity": 1.0,
        }
    )

    @model_validator(mode="after")
    def _check(self) -> "ClinicalConfig":
        unknown = sorted(set(self.trd_shifts) - set(self.names))
        if unknown:
            raise ValueError(f"trd_shifts names unknown variables {unknown}; variables: {self.names}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("clinical variable names must be unique")
        return self


class ThreeWaySplit(Strict):
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    @model_validator(mode="after")
    def _check(self) -> "ThreeWaySplit":
        if min(self.train, self.val, self.test) <= 0 or abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError("train, val and test fractions must be positive and sum to 1")
        return self


# --------------------------------------------------------------------------- split sizes
# The splits are made by scikit-learn once every shard exists; a cohort too small
# to split would leave a directory of shards and no manifest.  These checks follow
# sklearn's rules (held = ceil(fraction * n), kept = n - held, each of the two at
# least one subject per class, every class at least 2 subjects) without importing
# it (1.4 s) on every config load.  Class counts of the part kept are taken at
# their lower bound, so a borderline size may be refused although sklearn's draw
# would have split it; generate() also runs the real splits on the real labels
# before it writes anything (data.generate.check_splittable).
def _stratified_problem(
    n: int, fraction: float, part: str, counts: list[int] | None, n_classes: int
) -> tuple[str | None, list[int] | None]:
    """(why a stratified hold-out of ``fraction`` fails or None, lower bounds of the kept part's class counts)."""
    if counts is not None and min(counts) < 2:
        return f"a class has {min(counts)} subject(s) before {part} is drawn (at least 2 needed)", None
    held = math.ceil(fraction * n)
    kept = n - held
    if held < n_classes:
        return f"{part} would get {held} subject(s) for {n_classes} classes", None
    if kept < n_classes:
        return f"{kept} subject(s) would be left beside {part} for {n_classes} classes", None
    return None, None if counts is None else [kept * c // n for c in counts]


def emt_split_problem(n: int, split: "ThreeWaySplit") -> str | None:
    # Odd ids are TRD (emt_cohort.emt_label), so the class counts are known.
    counts = [n - n // 2, n // 2]
    why, rest = _stratified_problem(n, split.test, "the test part", counts, 2)
    if why:
        return why
    n_rest = n - math.ceil(split.test * n)
    why, _ = _stratified_problem(n_rest, split.val / (split.train + split.val), "the val part", rest, 2)
    return why


def volume_split_problem(n: int, split: "VolumeSplit") -> str | None:
    # Classes are drawn per subject, so only the sizes are checked here (3 classes).
    why, _ = _stratified_problem(n, split.test, "the test part", None, 3)
    if why:
        return why
    why, _ = _stratified_problem(n - math.ceil(split.test * n), split.val, "the val part", None, 3)
    if why:
        return why
    if split.folds > n:
        return f"{split.folds} folds need at least {split.folds} subjects"
    rest = n - math.ceil(n / split.folds)  # the training side of the largest fold
    why, _ = _stratified_problem(rest, split.val, "the val part of a cross-validation fold", None, 3)
    return why


def _split_error(n: int, split: BaseModel, problem) -> str | None:
    why = problem(n, split)
    if why is None:
        return None
    at_least = next((m for m in range(n + 1, n + 100_000) if problem(m, split) is None), None)
    fractions = ", ".join(f"{k}={v}" for k, v in split.model_dump().items())
    hint = f"; the smallest cohort that splits is n_subjects={at_least}" if at_least else ""
    return f"cohort.n_subjects={n} is too few to split ({fractions}): {why}{hint}"


class EMTCohortConfig(Strict):
    kind: Literal["emt"] = "emt"
    n_subjects: int = Field(1000, ge=4)
    seed: int = 42
    subjects_per_shard: int = Field(128, ge=1)
    fmri: FMRIConfig = Field(default_factory=FMRIConfig)
    regions: dict[str, RegionEffect] = Field(default_factory=_default_regions)
    snp: SNPConfig = Field(default_factory=SNPConfig)
    clinical: ClinicalConfig = Field(default_factory=ClinicalConfig)
    split: ThreeWaySplit = Field(default_factory=ThreeWaySplit)

    # What the models and the evaluation read of an EMT cohort, synthetic or ingested
    # (IngestedEMTCohort has the same properties): input shapes, names, region boxes.
    @property
    def fmri_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.fmri.shape)

    @property
    def n_snps(self) -> int:
        return self.snp.n_snps

    @property
    def clinical_names(self) -> list[str]:
        return list(self.clinical.names)

    @property
    def genotype_values(self) -> int:
        return 3  # 0/1/2 copies; generated genotypes are never missing

    @property
    def n_predictive_snps(self) -> int:
        return self.snp.n_predictive

    @property
    def region_boxes(self) -> dict[str, Box]:
        return {k: r.box for k, r in self.regions.items()}

    @property
    def labelled(self) -> bool:
        return True

    @model_validator(mode="after")
    def _check(self) -> "EMTCohortConfig":
        spatial = self.fmri.shape[:3]
        for name, r in self.regions.items():
            for axis, ((lo, hi), size) in enumerate(zip(r.box, spatial)):
                if not 0 <= lo < hi <= size:
                    raise ValueError(f"regions.{name}.box axis {axis} = [{lo}, {hi}) is empty or outside 0..{size}")
        err = _split_error(self.n_subjects, self.split, emt_split_problem)
        if err:
            raise ValueError(err)
        return self


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
        err = _split_error(self.n_subjects, self.split, volume_split_problem)
        if err:
            raise ValueError(err)
        return self


# --------------------------------------------------------------------------- ingested cohorts
# `trd-hpc ingest SPEC.yaml` reads a spec (the keys of the *Spec classes), checks it against
# the files it names and records the result as the cohort config of the manifest (the
# Ingested* classes: the spec plus what was resolved from the files).  Runs on an ingested
# cohort take that record as their `cohort` section (trd_hpc.train.run.resolve_cohort).
class SNPSelection(Strict):
    """Which variants of the PLINK fileset: the first N of the .bim, or the ids listed one a
    line in a file (in that order)."""

    first: Optional[int] = Field(None, ge=1)
    ids: Optional[str] = None

    @model_validator(mode="after")
    def _one(self) -> "SNPSelection":
        if (self.first is None) == (self.ids is None):
            raise ValueError("give exactly one of snps.first (a count) or snps.ids (a file of variant ids)")
        return self


class IngestSpecBase(Strict):
    table: str  # .tsv or .csv, relative to the spec's folder
    id_column: str = "participant_id"
    # Values of the label column in class order (class 0 first); None: the values are the
    # class indices themselves (0/1 for the EMT, 0/1/2 for the CNN).
    labels: Optional[list[Union[int, str]]] = None
    site_column: Optional[str] = None  # no site in two splits (or two folds)
    on_missing: Literal["error", "drop"] = "error"  # subjects without an image or genotypes
    seed: int = 42  # of the splits
    subjects_per_shard: int = Field(64, ge=1)


class EMTIngestSpec(IngestSpecBase):
    task: Literal["emt"] = "emt"
    label_column: Optional[str] = None  # None: an unlabelled cohort (prediction only)
    clinical_columns: list[str] = Field(min_length=1)
    # Missing clinical values: refuse (listing them), or impute with the training split's mean.
    clinical_missing: Literal["error", "impute"] = "error"
    fmri: str  # path template with {id}: one 4-D image per subject
    genotypes: str  # PLINK prefix (.bed/.bim/.fam)
    snps: SNPSelection = Field(default_factory=lambda: SNPSelection(first=800))
    grid: tuple[PosInt, PosInt, PosInt] = (48, 48, 24)
    frames: int = Field(80, ge=1)
    # crop: the first `frames` frames (fewer is an error); resample: linear in time to `frames`.
    temporal: Literal["crop", "resample"] = "crop"
    fmri_dtype: Literal["float16", "float32"] = "float16"
    split: ThreeWaySplit = Field(default_factory=ThreeWaySplit)

    @model_validator(mode="after")
    def _unique(self) -> "EMTIngestSpec":
        if len(set(self.clinical_columns)) != len(self.clinical_columns):
            raise ValueError("clinical_columns must be unique")
        if self.labels is not None and len(self.labels) != 2:
            raise ValueError(f"labels must name the 2 values of label_column (non-TRD first), got {self.labels}")
        return self


class CNN3DIngestSpec(IngestSpecBase):
    task: Literal["cnn3d"] = "cnn3d"
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


class Resolved(Strict):
    """What `trd-hpc ingest` found in the files (never written in a spec)."""

    root: str  # the spec's folder, absolute: the spec's paths are relative to it
    table_sha256: str
    n_subjects: int = Field(ge=1)
    dropped: list[dict[str, str]] = Field(default_factory=list)  # {participant_id, reason}


class IngestedEMTCohort(EMTIngestSpec):
    kind: Literal["ingested_emt"] = "ingested_emt"
    resolved: Resolved
    snp_ids: list[str] = Field(min_length=1)
    genotypes_sha256: str  # of the .fam and .bim (which individuals, which variants)
    # Standardisation of the clinical columns (the model sees (x - mean) / sd, a missing
    # value as 0 = the mean): fitted on the training split only.
    clinical_mean: list[float]
    clinical_sd: list[float]

    @property
    def n_subjects(self) -> int:
        return self.resolved.n_subjects

    @property
    def fmri_shape(self) -> tuple[int, int, int, int]:
        return (*self.grid, self.frames)

    @property
    def n_snps(self) -> int:
        return len(self.snp_ids)

    @property
    def clinical_names(self) -> list[str]:
        return list(self.clinical_columns)

    @property
    def genotype_values(self) -> int:
        return 4  # 0/1/2 copies of the A1 allele, 3 = missing call (its own embedding)

    @property
    def n_predictive_snps(self) -> int:
        return 0  # unknown for real data

    @property
    def region_boxes(self) -> dict[str, Box]:
        """No atlas comes with a real cohort: the 8 octants of the grid stand in for regions."""
        half = [(0, g // 2, g) for g in self.grid]
        boxes = {}
        for xs, xn in (((half[0][0], half[0][1]), "left"), ((half[0][1], half[0][2]), "right")):
            for ys, yn in (((half[1][0], half[1][1]), "posterior"), ((half[1][1], half[1][2]), "anterior")):
                for zs, zn in (((half[2][0], half[2][1]), "inferior"), ((half[2][1], half[2][2]), "superior")):
                    if xs[0] < xs[1] and ys[0] < ys[1] and zs[0] < zs[1]:
                        boxes[f"{xn}_{yn}_{zn}"] = (xs, ys, zs)
        return boxes

    @property
    def labelled(self) -> bool:
        return self.label_column is not None


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


def _cohort_kind(default: str):
    """The discriminator of a `cohort` section: its `kind` (``default`` when left out)."""

    def tag(v: Any) -> str:
        k = v.get("kind", default) if isinstance(v, dict) else getattr(v, "kind", default)
        return k if isinstance(k, str) else default

    return tag


EMTCohortSection = Annotated[
    Union[Annotated[EMTCohortConfig, Tag("emt")], Annotated[IngestedEMTCohort, Tag("ingested_emt")]],
    Discriminator(_cohort_kind("emt")),
]
VolumeCohortSection = Annotated[
    Union[Annotated[VolumeCohortConfig, Tag("volume")], Annotated[IngestedVolumeCohort, Tag("ingested_volume")]],
    Discriminator(_cohort_kind("volume")),
]


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

    def split(self, role: str) -> str:
        """The cohort split that plays ``role`` (train | val | test) for this run."""
        return role if self.fold is None else f"fold:{self.fold}:{role}"


# --------------------------------------------------------------------------- models
class EMTModelConfig(Strict):
    """EMT (paper 000, section 2.2).  Input shapes come from the cohort section."""

    name: Literal["emt", "late_fusion_mlp"] = "emt"
    d_model: int = Field(256, ge=8)
    patch: tuple[PosInt, PosInt, PosInt] = (6, 6, 4)  # spatial; all frames kept in each token
    snp_embed_dim: int = Field(64, ge=1)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(8, ge=1)
    d_ff: int = Field(512, ge=1)
    # Dropout(0.2) of the paper: patch embedding, clinical projection and head.
    dropout: float = Field(0.2, ge=0, lt=1)
    # Inside the Transformer layers (attention and feed-forward).  The paper does
    # not say; PyTorch's default is 0.1.  Evaluation is the same either way.
    encoder_dropout: float = Field(0.1, ge=0, lt=1)
    head_hidden: int = Field(128, ge=1)  # chosen: the head's hidden width
    # late-fusion MLP baseline: per-modality encoders of this width, MLP head
    mlp_hidden: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "EMTModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


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
    baselines: list[
        Literal["late_fusion_mlp", "random_forest", "single_task_response", "single_task_severity", "resnet18"]
    ] = Field(default_factory=list)
    rf_estimators: int = Field(300, ge=1)
    importance_subjects: int = Field(64, ge=1)  # gradient x input on this many test subjects
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
    csv: bool = False  # also RUN_DIR/metrics.csv, one row per epoch, W&B on or off (tracking.py)


def _default_baselines(data: Any, names: list[str]) -> Any:
    """Each task's baselines unless the config lists its own (an empty list turns them off)."""
    if isinstance(data, dict):
        ev = data.get("eval")
        if ev is None:
            data = {**data, "eval": {"baselines": names}}
        elif isinstance(ev, dict) and "baselines" not in ev:
            data = {**data, "eval": {**ev, "baselines": names}}
    return data


class EMTExperiment(Strict):
    task: Literal["emt"] = "emt"
    cohort: EMTCohortSection = Field(default_factory=EMTCohortConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: EMTModelConfig = Field(default_factory=EMTModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(baselines=["late_fusion_mlp", "random_forest"]))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _baselines(cls, data: Any) -> Any:
        return _default_baselines(data, ["late_fusion_mlp", "random_forest"])

    @model_validator(mode="after")
    def _patch_fits(self) -> "EMTExperiment":
        # The EMT cuts the fMRI volume into whole patches; checked here, where both
        # sections are known, instead of failing when the model is built.
        if self.model.name == "emt":
            spatial = tuple(self.cohort.fmri_shape[:3])
            bad = [f"axis {a}: {s} % {p} = {s % p}" for a, (s, p) in enumerate(zip(spatial, self.model.patch)) if s % p]
            if bad:
                where = (
                    "cohort.grid (the ingest spec's grid)"
                    if self.cohort.kind == "ingested_emt"
                    else "cohort.fmri.shape"
                )
                raise ValueError(
                    f"model.patch {tuple(self.model.patch)} does not divide the spatial shape {spatial} of "
                    f"{where} ({'; '.join(bad)}); change model.patch or {where.split(' ')[0]}"
                )
        return self


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
    eval: EvalConfig = Field(
        default_factory=lambda: EvalConfig(
            calibration=[], baselines=["single_task_response", "single_task_severity", "resnet18"]
        )
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _baselines(cls, data: Any) -> Any:
        data = _default_baselines(data, ["single_task_response", "single_task_severity", "resnet18"])
        # A partial `train:` section overrides paper 001's training defaults key by key
        # (not the generic TrainConfig defaults, which are paper 000's).
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data = {**data, "train": _deep_merge(_cnn_train().model_dump(), data["train"])}
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


ExperimentConfig = Union[EMTExperiment, CNN3DExperiment]
CohortConfig = Union[EMTCohortConfig, VolumeCohortConfig, IngestedEMTCohort, IngestedVolumeCohort]
# Experiment classes by `task` value.  The two papers' are here; a task added through the
# registry (trd_hpc.tasks.register) adds its own class, so the config layer never imports
# the tasks.
_TASKS: dict[str, type[BaseModel]] = {"emt": EMTExperiment, "cnn3d": CNN3DExperiment}
_COHORTS: dict[str, type[BaseModel]] = {
    "emt": EMTCohortConfig,
    "volume": VolumeCohortConfig,
    "ingested_emt": IngestedEMTCohort,
    "ingested_volume": IngestedVolumeCohort,
}


def register_cohort(kind: str, cls: type[BaseModel]) -> None:
    """Make ``kind: NAME`` in a cohort section validate with ``cls`` (trd_hpc.data.kinds.register)."""
    have = _COHORTS.get(kind)
    if have is not None and have is not cls:
        raise ValueError(f"cohort kind {kind!r} already has the config class {have.__name__}")
    _COHORTS[kind] = cls


def register_experiment(task: str, cls: type[BaseModel]) -> None:
    """Make ``task: NAME`` in a config validate with ``cls`` (called by trd_hpc.tasks.register)."""
    have = _TASKS.get(task)
    if have is not None and have is not cls:
        raise ValueError(f"task {task!r} already has the config class {have.__name__}")
    _TASKS[task] = cls


# --------------------------------------------------------------------------- loading
def _tagged_members(ann: Any) -> dict[str, type] | None:
    """{tag: class} of a tagged union (a `cohort` section), else None."""
    import typing

    if typing.get_origin(ann) is not Union:
        return None
    out = {}
    for member in typing.get_args(ann):
        args = typing.get_args(member)
        tags = [a for a in args[1:] if isinstance(a, Tag)]
        if not tags:
            return None
        out[tags[0].tag] = args[0]
    return out


def _walk(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, tuple]:
    """(the pydantic model class that owns the field at ``loc``, ``loc`` without union tags).

    A tagged union (the `cohort` section) puts its tag into the error's location
    (``cohort.emt.bogus``); the key a user wrote has none."""
    import typing

    model: Any = root
    keys: list = []
    skip_key = False  # the next loc part is a dict key or list index
    pending_union: dict[str, type] | None = None
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if pending_union is not None:
            model, pending_union = pending_union.get(str(part)), None
            continue
        keys.append(part)
        if last:
            break
        if skip_key:
            skip_key = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            model = None
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            model = None
            continue
        ann = field.annotation
        members = _tagged_members(ann)
        if members is not None:
            pending_union = members
            continue
        if typing.get_origin(ann) in (dict, list):
            ann = typing.get_args(ann)[-1]
            skip_key = True
        model = ann
    owner = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    return owner, tuple(keys)


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for listing valid keys)."""
    return _walk(root, loc)[0]


def format_validation_error(err: ValidationError, root: type[BaseModel], source: str, what: str = "config") -> str:
    """pydantic's errors as lines naming each dotted key; an unknown key lists the valid ones there."""
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        owner, loc = _walk(root, tuple(e["loc"]))
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            valid = sorted(owner.model_fields) if owner else []
            lines.append(f"  unknown key '{key}'; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  '{key}': missing")
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            lines.append(f"  '{key}.kind' must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check across keys: its message names them; the input is a whole section.
            lines.append(f"  '{key}': {msg}" if loc else f"  {msg}")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            lines.append(f"  '{key}': {msg} (got {got_s})")
    return "\n".join(lines)


def _read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; ConfigError naming the file when it is missing or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def merge_overrides(data: dict, overrides: list[str] | None, source: str = "") -> dict:
    """Apply dotted ``key=value`` overrides (OmegaConf parses the values)."""
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. cohort.n_subjects=2000)")
    try:
        base = OmegaConf.create(data)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        uses = _resolver_uses(OmegaConf.to_container(merged, resolve=False))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply overrides {overrides} to {source or 'config'}: {e}") from e
    if uses:
        key, name = uses[0]
        raise ConfigError(
            f"{source or 'config'}: key '{key}' calls the OmegaConf resolver '{name}' (${{{name}:...}}); resolvers are "
            f"not allowed (they read the environment, and the value would be written into the run's config.yaml): "
            f"write the value itself" + (f" (also in: {', '.join(k for k, _ in uses[1:])})" if len(uses) > 1 else "")
        )
    try:
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply overrides {overrides} to {source or 'config'}: {e}") from e


def _resolver_call(text: str) -> str | None:
    """The name of a resolver ``text`` calls anywhere (``oc.env``; ``${...}.env`` when the name
    is itself an interpolation), or None.

    Read from OmegaConf's own parse tree, not a pattern: a pattern misses what the grammar
    accepts (``x\\\\${oc.env:V}`` is an escaped backslash then a live call; in
    ``${${tracking.group}.env:V}`` the resolver's name is an interpolation), and anything the
    grammar calls a resolver is refused, whatever it resolves to."""
    if "${" not in text:
        return None
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as P

    try:
        tree = grammar_parser.parse(text)
    except Exception:  # not valid interpolation syntax: OmegaConf itself refuses it on resolve
        return None
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, P.InterpolationResolverContext):
            name = node.resolverName()
            return name.getText() if name is not None else "?"
        stack.extend(node.getChild(i) for i in range(node.getChildCount()) if not hasattr(node.getChild(i), "symbol"))
    return None


def _resolver_uses(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, resolver name) of every string value that calls a resolver."""
    if isinstance(node, dict):
        return [u for k, v in node.items() for u in _resolver_uses(v, f"{prefix}{k}.")]
    if isinstance(node, (list, tuple)):
        return [u for i, v in enumerate(node) for u in _resolver_uses(v, f"{prefix}{i}.")]
    if isinstance(node, str):
        name = _resolver_call(node)
        if name:
            return [(prefix[:-1], name)]
    return []


def validate_experiment(data: dict, source: str = "config") -> ExperimentConfig:
    task = data.get("task")
    if task not in _TASKS:
        raise ConfigError(f"{source}: key 'task' must be one of {sorted(_TASKS)}, got {task!r}")
    model = _TASKS[task]
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None


def _read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """An experiment YAML with its ``extends: OTHER.yaml`` chain merged in (OTHER relative to
    the file naming it; this file's keys win), so a variant config states only what differs."""
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: key 'extends' must name one config file, got {parent!r}")
    target = (path.parent / parent).resolve()
    if target in seen or target == path.resolve():
        chain = " -> ".join(str(p) for p in (*seen, path.resolve(), target))
        raise ConfigError(f"{path}: key 'extends' makes a cycle: {chain}")
    if not target.is_file():
        raise ConfigError(f"{path}: key 'extends': config file not found: {target}")
    return _deep_merge(_read_config_file(target, (*seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    data = merge_overrides(_read_config_file(path), overrides, str(path))
    return validate_experiment(data, str(path))


def validate_cohort(data: dict, source: str = "cohort config") -> CohortConfig:
    kind = data.get("kind")
    if kind not in _COHORTS:
        raise ConfigError(f"{source}: key 'kind' must be one of {sorted(_COHORTS)}, got {kind!r}")
    model = _COHORTS[kind]
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data['a']['b'] = value`` for ``key='a.b'`` (missing levels are created, so validation
    reports an unknown key by name; the value is copied)."""
    import copy

    *path, last = key.split(".")
    node = data
    for part in path:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[last] = copy.deepcopy(value)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys: ``{"test": {"auc": 1}}`` -> ``{"test.auc": 1}``.
    Lists stay values; so does an empty mapping (a section set to ``{}`` is visible)."""
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out


def derive(cfg: BaseModel, updates: dict[str, Any], source: str = "derived config") -> Any:
    """A new config: ``cfg`` as a dict, the dotted ``updates`` set, validated again whole.

    The one way to make a config from another (a baseline's, a fold's, a benchmark's): setting
    attributes on a copy (pydantic's ``model_copy``, or assignment) validates only the field
    set, so a cross-key rule (a single-task baseline's early-stopping monitor, the patch that
    must divide the fMRI shape) would not be applied again."""
    data = to_dict(cfg)
    for key, value in updates.items():
        set_dotted(data, key, value)
    if isinstance(cfg, tuple(_TASKS.values())):
        return validate_experiment(data, source)
    try:
        return type(cfg).model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, type(cfg), source)) from None


def to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
