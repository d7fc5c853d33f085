"""Paper 000's config classes: the synthetic EMT cohort, the ingested one, the model, the
experiment (``task: emt``).  Registered by name through ``trd_hpc.config`` (EXPERIMENT,
COHORTS, INGEST_SPEC at the bottom)."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, model_validator

from trd_hpc.cohort_config import (
    BidsImages,
    Confounds,
    IngestSpecBase,
    Resolved,
    ThreeWaySplit,
    cohort_kind,
    split_error,
    stratified_problem,
)
from trd_hpc.sections import Box, DataConfig, EvalConfig, PosInt, Strict, TrackingConfig, TrainConfig, default_baselines

BASELINES = ("late_fusion_mlp", "random_forest")
# the flags of the shards' `present` column, in order (what data.complete_cases may name)
MODALITIES = ("fmri", "genotypes", "clinical")


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
    # 0: a cohort without genotypes (the EMT and the late-fusion MLP are built without a SNP branch)
    n_snps: int = Field(800, ge=0)
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


def emt_split_problem(n: int, split: "ThreeWaySplit") -> str | None:
    # Odd ids are TRD (emt_cohort.emt_label), so the class counts are known.
    counts = [n - n // 2, n // 2]
    why, rest = stratified_problem(n, split.test, "the test part", counts, 2)
    if why:
        return why
    n_rest = n - math.ceil(split.test * n)
    why, _ = stratified_problem(n_rest, split.val / (split.train + split.val), "the val part", rest, 2)
    return why


class MissingRates(Strict):
    """Fraction of subjects generated without each modality (its values zero, ``present`` 0):
    a cohort to measure what the EMT's missing tokens recover.  Drawn from a stream of its own
    (seed, subject), so every subject's data are those of the complete cohort."""

    fmri: float = Field(0.0, ge=0, lt=1)
    snp: float = Field(0.0, ge=0, lt=1)
    clinical: float = Field(0.0, ge=0, lt=1)

    @property
    def any(self) -> bool:
        return self.fmri > 0 or self.snp > 0 or self.clinical > 0


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
    missing: MissingRates = Field(default_factory=MissingRates)

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
    def fmri_regions(self) -> list[str] | None:
        return None  # the fMRI is a voxel grid (an ingested cohort with an atlas: region names)

    @property
    def modality_mask(self) -> bool:
        """Subjects may lack a modality (``missing`` rates): shards hold ``present`` [fmri, snp, clinical]."""
        return self.missing.any

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
        err = split_error(self.n_subjects, self.split, emt_split_problem)
        if err:
            raise ValueError(err)
        if self.missing.snp > 0 and not self.snp.n_snps:
            raise ValueError("missing.snp hides genotypes, and snp.n_snps is 0: this cohort has none to hide")
        return self


# --------------------------------------------------------------------------- ingested cohorts
# `trd-hpc ingest SPEC.yaml` reads a spec (the keys of the *Spec classes), checks it against
# the files it names and records the result as the cohort config of the manifest (the
# Ingested* classes: the spec plus what was resolved from the files).  Runs on an ingested
# cohort take that record as their `cohort` section (trd_hpc.cohort.resolve_cohort).
class SNPSelection(Strict):
    """Which variants of the PLINK fileset: the first N of the .bim, or the ids listed one a
    line in a file (in that order); then, optionally, PLINK 1.9's quality filters
    (trd_hpc.ingest.genotype_qc): mind over all subjects, geno / hwe / maf on the training
    split only."""

    first: Optional[int] = Field(None, ge=1)
    ids: Optional[str] = None
    mind: Optional[float] = Field(None, ge=0, le=1)  # drop subjects missing more calls than this
    geno: Optional[float] = Field(None, ge=0, le=1)  # drop variants missing more calls than this
    hwe: Optional[float] = Field(None, gt=0, le=1)  # drop variants with an HWE exact p-value below this
    maf: Optional[float] = Field(None, ge=0, le=0.5)  # drop variants with a minor-allele frequency below this

    @property
    def variant_filters(self) -> bool:
        return any(v is not None for v in (self.geno, self.hwe, self.maf))

    @model_validator(mode="after")
    def _one(self) -> "SNPSelection":
        if (self.first is None) == (self.ids is None):
            raise ValueError("give exactly one of snps.first (a count) or snps.ids (a file of variant ids)")
        return self


class Atlas(Strict):
    """Region time series instead of voxels: each subject's fMRI becomes regions x frames,
    the mean over each region's voxels (``nilearn.maskers.NiftiLabelsMasker``; a 4-D
    probabilistic atlas: ``NiftiMapsMasker``), in the images' world space."""

    image: str  # a labels image (integers, 0 = background) or a 4-D probabilistic atlas
    # TSV with columns index and name (BIDS dseg.tsv); None: the regions are named region_<index>
    labels: Optional[str] = None


class EMTIngestSpec(IngestSpecBase):
    task: Literal["emt"] = "emt"
    cohort_kind: ClassVar[str] = "ingested_emt"  # what it resolves to (its IngestMapping)
    label_column: Optional[str] = None  # None: an unlabelled cohort (prediction only)
    clinical_columns: list[str] = Field(min_length=1)
    # Missing clinical values: refuse (listing them), or impute with the training split's mean.
    clinical_missing: Literal["error", "impute"] = "error"
    # one 4-D image per subject: a path template with {id}, or BIDS entities in a derivatives folder
    fmri: Union[str, BidsImages]
    confounds: Optional[Confounds] = None  # regressed out (nilearn); needs fmri: {derivatives: ...}
    atlas: Optional[Atlas] = None  # region x time series (then grid is not used)
    # PLINK prefix (.bed/.bim/.fam); None (left out): a cohort without genotypes, whose EMT is
    # built without a SNP branch (then snps: does not apply)
    genotypes: Optional[str] = None
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
        if self.confounds is not None and isinstance(self.fmri, str):
            raise ValueError(
                "confounds needs fmri: {derivatives: DIR, ...} (each subject's confounds TSV is found by its entities)"
            )
        if self.genotypes is None and self.snps != SNPSelection(first=800):
            raise ValueError("snps selects variants of genotypes:, which the spec does not name (no genotypes)")
        return self


class IngestedEMTCohort(EMTIngestSpec):
    kind: Literal["ingested_emt"] = "ingested_emt"
    resolved: Resolved
    snp_ids: list[str] = Field(default_factory=list)  # empty only without genotypes
    genotypes_sha256: Optional[str] = None  # of the .fam and .bim (which individuals, which variants)
    # Standardisation of the clinical columns (the model sees (x - mean) / sd, a missing
    # value as 0 = the mean): fitted on the training split only.
    clinical_mean: list[float]
    clinical_sd: list[float]
    # with an atlas: the regions in label order (resolved from its image and labels TSV), the
    # labels' values, and the atlas files' sha256
    region_names: list[str] = Field(default_factory=list)
    region_labels: list[int] = Field(default_factory=list)
    atlas_sha256: Optional[str] = None
    # what snps.mind/geno/hwe/maf removed (trd_hpc.ingest.genotype_qc.filter_variants), or None
    snp_qc: Optional[dict] = None

    @model_validator(mode="after")
    def _variants(self) -> "IngestedEMTCohort":
        if self.genotypes is not None and (not self.snp_ids or self.genotypes_sha256 is None):
            raise ValueError("a cohort with genotypes records its snp_ids (at least one) and genotypes_sha256")
        return self

    @property
    def n_subjects(self) -> int:
        return self.resolved.n_subjects

    @property
    def fmri_shape(self) -> tuple[int, ...]:
        """(X, Y, Z, frames) on the grid, or (regions, frames) with an atlas."""
        return (len(self.region_names), self.frames) if self.atlas is not None else (*self.grid, self.frames)

    @property
    def fmri_regions(self) -> list[str] | None:
        return list(self.region_names) if self.atlas is not None else None

    @property
    def modality_mask(self) -> bool:
        """Subjects may lack a modality (on_missing: keep): shards hold ``present`` [fmri, genotypes, clinical]."""
        return self.on_missing == "keep"

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
        """Without an atlas the 8 octants of the grid stand in for regions (with one, the
        fMRI is per region already: fmri_regions)."""
        if self.atlas is not None:
            return {}
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


EMTCohortSection = Annotated[
    Union[Annotated[EMTCohortConfig, Tag("emt")], Annotated[IngestedEMTCohort, Tag("ingested_emt")]],
    Discriminator(cohort_kind("emt")),
]


# --------------------------------------------------------------------------- models
class EMTModelConfig(Strict):
    """EMT (paper 000, section 2.2).  Input shapes come from the cohort section."""

    name: Literal["emt", "late_fusion_mlp"] = "emt"
    d_model: int = Field(256, ge=8)
    patch: tuple[PosInt, PosInt, PosInt] = (6, 6, 4)  # spatial; all frames kept in each token
    # Region x time fMRI (an ingested cohort with an atlas): each token is one region's run of
    # this many frames (None: its whole series, one token per region).
    time_patch: Optional[PosInt] = None
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


class EMTEvalConfig(EvalConfig):
    baselines: list[Literal[BASELINES]] = Field(default_factory=list)  # type: ignore[valid-type]
    rf_estimators: int = Field(300, ge=1)
    importance_subjects: int = Field(64, ge=1)  # gradient x input on this many test subjects


class EMTExperiment(Strict):
    task: Literal["emt"] = "emt"
    cohort: EMTCohortSection = Field(default_factory=EMTCohortConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: EMTModelConfig = Field(default_factory=EMTModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EMTEvalConfig = Field(default_factory=lambda: EMTEvalConfig(baselines=list(BASELINES)))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _baselines(cls, data: Any) -> Any:
        return default_baselines(data, list(BASELINES))

    @model_validator(mode="after")
    def _complete_cases(self) -> "EMTExperiment":
        unknown = [n for n in self.data.complete_cases if n not in MODALITIES]
        if unknown:
            raise ValueError(
                f"data.complete_cases: {', '.join(unknown)} is not a modality of the EMT; one of {', '.join(MODALITIES)}"
            )
        return self

    @model_validator(mode="after")
    def _patch_fits(self) -> "EMTExperiment":
        # The EMT cuts the fMRI volume into whole patches; checked here, where both
        # sections are known, instead of failing when the model is built.
        if getattr(self.cohort, "fmri_regions", None) is not None:
            frames = self.cohort.fmri_shape[1]
            if self.model.time_patch is not None and frames % self.model.time_patch:
                raise ValueError(
                    f"model.time_patch {self.model.time_patch} does not divide the cohort's {frames} frames; "
                    "change model.time_patch or the ingest spec's frames"
                )
        elif self.model.name == "emt":
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


EXPERIMENT = EMTExperiment
COHORTS = {"emt": EMTCohortConfig, "ingested_emt": IngestedEMTCohort}
INGEST_SPEC = EMTIngestSpec
