"""What the papers' cohort and ingest config sections share: split fractions and the check that
a cohort is large enough to split, the base of an ingest spec and what ingest resolved, and
the discriminator of a ``cohort`` section (its ``kind``)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from trd_hpc.sections import Strict


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
def stratified_problem(
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


def split_error(n: int, split: BaseModel, problem) -> str | None:
    why = problem(n, split)
    if why is None:
        return None
    at_least = next((m for m in range(n + 1, n + 100_000) if problem(m, split) is None), None)
    fractions = ", ".join(f"{k}={v}" for k, v in split.model_dump().items())
    hint = f"; the smallest cohort that splits is n_subjects={at_least}" if at_least else ""
    return f"cohort.n_subjects={n} is too few to split ({fractions}): {why}{hint}"


class BidsImages(Strict):
    """One image per subject found by its BIDS entities in a derivatives folder (as fMRIPrep
    writes it: ``sub-<id>/[ses-<s>/]func/sub-<id>_task-<t>_space-<sp>_desc-preproc_bold.nii.gz``),
    instead of a path template.  Files are matched on their entities as pybids parses them;
    a subject with none is missing, one with several is an error naming them."""

    derivatives: str  # the derivatives folder, relative to the spec's folder
    suffix: str = "bold"
    desc: Optional[str] = "preproc"
    space: Optional[str] = None
    task: Optional[str] = None
    run: Optional[int] = Field(None, ge=0)
    session: Optional[str] = None
    acquisition: Optional[str] = None

    def entities(self) -> dict[str, Any]:
        """The entities a file must have (those named here; suffix always)."""
        names = ("suffix", "desc", "space", "task", "run", "session", "acquisition")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class Confounds(Strict):
    """Confound regression of each subject's fMRI with ``nilearn.signal.clean``: the columns of
    its ``*_desc-confounds_timeseries.tsv`` (fMRIPrep's names) regressed out, with nilearn's
    detrending, filtering and standardising."""

    # a named strategy ("motion+wm+csf+global": trd_hpc.ingest.confounds.STRATEGIES) or columns
    strategy: Union[str, list[str]] = "motion+wm+csf+global"
    detrend: bool = True
    standardize: Literal["zscore_sample", "zscore", "psc", False] = "zscore_sample"
    high_pass: Optional[float] = Field(None, gt=0)  # Hz; needs the repetition time
    low_pass: Optional[float] = Field(None, gt=0)
    # seconds; None: RepetitionTime of the image's JSON sidecar, else its header
    t_r: Optional[float] = Field(None, gt=0)


class Harmonize(Strict):
    """ComBat site harmonisation of each subject's resampled volume, voxel by voxel
    (trd_hpc.ingest.harmonize): the site's location and scale per voxel removed with
    neuroCombat's empirical-Bayes estimates, the covariates' effects kept.

    Fitted on the training split only; ``estimates:`` applies a fitted set instead (a
    bundle's ``harmonization.npz``: what ``trd-hpc predict --bids`` does)."""

    method: Literal["combat"] = "combat"
    site_column: str  # the scanner or site of each subject
    categorical: list[str] = Field(default_factory=list)  # covariates whose effects stay (sex, diagnosis)
    continuous: list[str] = Field(default_factory=list)  # (age)
    fit_on: str = "train"
    estimates: Optional[str] = None  # relative to the spec's folder; None: fit them

    @field_validator("fit_on")
    @classmethod
    def _train_only(cls, v: str) -> str:
        if v != "train":
            raise ValueError(
                f"{v!r} is refused: only 'train'. Fitted on validation or test subjects, ComBat's site "
                "estimates would carry their volumes into the training data and the scores measured on them "
                "would no longer be held out"
            )
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "Harmonize":
        both = set(self.categorical) & set(self.continuous)
        if both or self.site_column in {*self.categorical, *self.continuous}:
            raise ValueError(f"a column is named twice: {', '.join(sorted(both) or [self.site_column])}")
        return self


class IngestSpecBase(Strict):
    table: str  # .tsv or .csv, relative to the spec's folder
    id_column: str = "participant_id"
    # Values of the label column in class order (class 0 first); None: the values are the
    # class indices themselves (0/1 for the EMT, 0/1/2 for the CNN).
    labels: Optional[list[Union[int, str]]] = None
    site_column: Optional[str] = None  # no site in two splits (or two folds)
    # more columns whose values keep subjects together (a family id): subjects linked through any
    # of these or site_column form one group, and a group is never in two splits or folds
    group_columns: list[str] = Field(default_factory=list)
    # subjects without an image or genotypes: refuse (listing them), drop them (listed in the
    # manifest), or keep them with that modality marked absent (a model with a learned
    # "missing" token per modality: the EMT)
    on_missing: Literal["error", "drop", "keep"] = "error"
    seed: int = 42  # of the splits
    subjects_per_shard: int = Field(64, ge=1)
    # Each source's file format, by the spec key naming it ({fmri: nifti, genotypes: plink1,
    # table: tsv}); left out: the mapping's default (the table: by its suffix).
    # trd_hpc.ingest.readers lists the formats there are.
    formats: dict[str, str] = Field(default_factory=dict)
    harmonize: Optional[Harmonize] = None  # ComBat across sites, fitted on the training split


class HarmonizationFile(Strict):
    file: str  # the cohort's harmonization.npz (a bundle's copy travels with the model)
    sha256: str  # of the estimates' arrays (trd_hpc.ingest.harmonize.content_sha256)
    fitted_on: str  # "train: N subjects", or the estimates file applied
    sites: list[str]


class Resolved(Strict):
    """What `trd-hpc ingest` found in the files (never written in a spec)."""

    root: str  # the spec's folder, absolute: the spec's paths are relative to it
    table_sha256: str
    n_subjects: int = Field(ge=1)
    dropped: list[dict[str, str]] = Field(default_factory=list)  # {participant_id, reason}
    # harmonize: the estimates the shards were written with (trd_hpc.ingest.harmonize.prepare)
    harmonization: Optional[HarmonizationFile] = None


def cohort_kind(default: str):
    """The discriminator of a `cohort` section: its `kind` (``default`` when left out)."""

    def tag(v: Any) -> str:
        k = v.get("kind", default) if isinstance(v, dict) else getattr(v, "kind", default)
        return k if isinstance(k, str) else default

    return tag
