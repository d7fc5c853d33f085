"""EMT baselines (paper 000, section 2.3): a late-fusion MLP on per-modality
embeddings and a random forest on per-modality summary features; and
:func:`build_emt_model`, which picks the network named by ``model.name``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trd_hpc.tasks.emt.config import EMTCohortConfig, EMTExperiment, EMTModelConfig
from trd_hpc.tasks.emt.model import EMT, WithoutGenotypes, patch_grid


def region_summaries(fmri):
    """``[B, R, T]`` -> ``[B, R, 3]``: each region's mean, standard deviation and lag-1
    autocorrelation over time (z-scored region series differ in how slowly they move)."""
    x = fmri.double() if isinstance(fmri, torch.Tensor) else torch.as_tensor(np.asarray(fmri, dtype=np.float64))
    mean = x.mean(dim=2)
    c = x - mean.unsqueeze(2)
    var = (c * c).mean(dim=2)
    ac1 = (c[:, :, 1:] * c[:, :, :-1]).mean(dim=2) / var.clamp_min(1e-12)
    return torch.stack([mean, var.sqrt(), ac1], dim=2).float()


class LateFusionMLP(nn.Module):
    """Late fusion: each modality is encoded on its own to ``mlp_hidden``
    features, the three are concatenated and an MLP head gives the logit.

    * fMRI: the mean of each spatial patch (``model.patch``) over its voxels and
      all frames, ``[B, N_patches]`` -> Linear -> GELU; region x time fMRI: each region's
      mean, standard deviation and lag-1 autocorrelation over time, ``[B, 3 R]``;
    * SNPs: one-hot genotypes ``[B, 3 * n_snps]`` -> Linear -> GELU;
    * clinical: Linear -> GELU;
    * head: Linear(3h, h) -> GELU -> Dropout(dropout) -> Linear(h, 1).

    ``forward(fmri, snp, clinical) -> logit [B]``, the EMT's interface.  Without genotypes
    (``n_snps`` 0) there is no SNP encoder, the head reads 2h features and ``snp`` is None.
    """

    def __init__(
        self,
        model_cfg: EMTModelConfig,
        fmri_shape: Sequence[int],
        n_snps: int,
        n_clinical: int,
        genotype_values: int = 3,
        missing_tokens: bool = False,
    ):
        super().__init__()
        self.fmri_shape = tuple(int(s) for s in fmri_shape)
        self.regions = len(self.fmri_shape) == 2
        self.patch = tuple(int(p) for p in model_cfg.patch)
        self.grid = None if self.regions else patch_grid(self.fmri_shape, self.patch)
        self.n_snps, self.n_clinical = int(n_snps), int(n_clinical)
        self.genotype_values = int(genotype_values)
        h = model_cfg.mlp_hidden
        n_fmri = 3 * self.fmri_shape[0] if self.regions else math.prod(self.grid)
        self.fmri_enc = nn.Sequential(nn.Linear(n_fmri, h), nn.GELU())
        self.genotyped = self.n_snps > 0
        if self.genotyped:
            self.snp_enc = nn.Sequential(nn.Linear(self.genotype_values * self.n_snps, h), nn.GELU())
        self.clin_enc = nn.Sequential(nn.Linear(self.n_clinical, h), nn.GELU())
        width = (3 if self.genotyped else 2) * h
        self.head = nn.Sequential(nn.Linear(width, h), nn.GELU(), nn.Dropout(model_cfg.dropout), nn.Linear(h, 1))
        # an absent modality's encoding replaced by a learned one (as the EMT's missing tokens)
        self.missing = nn.Parameter(torch.zeros(3, h)) if missing_tokens else None

    @classmethod
    def from_config(cls, exp: EMTExperiment) -> "LateFusionMLP":
        co = exp.cohort
        return cls(
            exp.model, co.fmri_shape, co.n_snps, len(co.clinical_names), co.genotype_values,
            missing_tokens=getattr(co, "modality_mask", False),
        )  # fmt: skip

    def patch_means(self, fmri: torch.Tensor) -> torch.Tensor:
        """``[B, X, Y, Z, T]`` -> per-patch means ``[B, N_patches]`` (patchify order),
        accumulated in float32 without an upcast copy of the input."""
        if tuple(fmri.shape[1:]) != self.fmri_shape:
            raise ValueError(f"fmri must be [B, {', '.join(map(str, self.fmri_shape))}], got {tuple(fmri.shape)}")
        if self.regions:
            return region_summaries(fmri).flatten(1)
        b, t = fmri.shape[0], fmri.shape[4]
        (nx, ny, nz), (px, py, pz) = self.grid, self.patch
        v = fmri.reshape(b, nx, px, ny, py, nz, pz, t)
        acc = torch.float64 if fmri.dtype == torch.float64 else torch.float32
        return v.mean(dim=(2, 4, 6, 7), dtype=acc).reshape(b, nx * ny * nz)

    def forward(
        self, fmri: torch.Tensor, snp: torch.Tensor | None, clinical: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        dt = self.head[0].weight.dtype
        f = self.fmri_enc(self.patch_means(fmri).to(dt))
        c = self.clin_enc(clinical.to(dt))
        # (modality index in `present`, encoding): the SNPs' only for a cohort with genotypes
        parts = [(0, f), (2, c)]
        if self.genotyped:
            parts.insert(1, (1, self.snp_enc(F.one_hot(snp.long(), self.genotype_values).flatten(1).to(dt))))
        if present is not None and self.missing is not None:
            has = present.to(torch.bool)
            parts = [(k, torch.where(has[:, k, None], e, self.missing[k].to(dt))) for k, e in parts]
        return self.head(torch.cat([e for _, e in parts], dim=1)).squeeze(-1)


def build_emt_model(exp: EMTExperiment) -> nn.Module:
    """The network named by ``exp.model.name`` ("emt" or "late_fusion_mlp"); for a cohort
    without genotypes, built without its SNP branch and called without them (WithoutGenotypes)."""
    builders = {"emt": EMT, "late_fusion_mlp": LateFusionMLP}
    if exp.model.name not in builders:
        raise ValueError(f"model.name {exp.model.name!r} is not an EMT-task network; choose one of {sorted(builders)}")
    net = builders[exp.model.name].from_config(exp)
    return net if exp.cohort.n_snps else WithoutGenotypes(net)


# --------------------------------------------------------------------------- random forest
def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def emt_summary_feature_names(cohort_cfg: EMTCohortConfig) -> list[str]:
    """Names of the columns of :func:`emt_summary_features`, in order."""
    n_pred = cohort_cfg.n_predictive_snps
    width = len(str(max(n_pred - 1, 0)))
    named = cohort_cfg.fmri_regions
    fmri = (
        [f"fmri.{name}.{what}" for name in named for what in ("mean", "std", "ac1")]
        if named is not None
        else [f"fmri.{name}.mean" for name in cohort_cfg.region_boxes]
    )
    counts = ["snp.predictive.count1", "snp.predictive.count2", "snp.other.count1", "snp.other.count2"]
    return (
        fmri
        + ["fmri.global.mean", "fmri.global.std"]
        + (counts if cohort_cfg.n_snps else [])  # no genotypes: no SNP features
        + [f"snp.{j:0{width}d}" for j in range(n_pred)]
        + [f"clinical.{name}" for name in cohort_cfg.clinical_names]
    )


def emt_summary_features(batch: Mapping, cohort_cfg: EMTCohortConfig) -> tuple[np.ndarray, list[str]]:
    """Per-modality summary features of a batch, ``([B, F] float32, names)``.

    * fMRI: the mean of each named region box (``cohort.regions``, over its voxels
      and all frames) or, for region x time fMRI, each region's mean, standard deviation
      and lag-1 autocorrelation; then the global mean and standard deviation;
    * SNPs: the number of genotype-1 and genotype-2 SNPs among the first
      ``snp.n_predictive`` SNPs and among the rest, then the genotype (0/1/2) of
      each of the first ``n_predictive`` SNPs (``snp.000`` ...); none for a cohort without genotypes;
    * clinical: the values, by ``clinical.names``.

    ``batch`` holds ``fmri [B, X, Y, Z, T]``, ``snp [B, n_snps]`` and
    ``clinical [B, n_clinical]`` as numpy arrays or tensors (float16 is fine: sums
    are accumulated in float64).
    """
    fmri, clin = _np(batch["fmri"]), _np(batch["clinical"])
    b = fmri.shape[0]
    snp = _np(batch["snp"]) if cohort_cfg.n_snps else np.zeros((b, 0), dtype=np.uint8)  # a cohort without genotypes
    want_ndim = 1 + len(cohort_cfg.fmri_shape)
    if fmri.ndim != want_ndim or tuple(fmri.shape[1:]) != tuple(cohort_cfg.fmri_shape):
        raise ValueError(f"fmri must be [B, {', '.join(map(str, cohort_cfg.fmri_shape))}], got {fmri.shape}")
    if snp.shape != (b, cohort_cfg.n_snps):
        raise ValueError(f"snp must be [{b}, {cohort_cfg.n_snps}], got {snp.shape}")
    if clin.shape != (b, len(cohort_cfg.clinical_names)):
        raise ValueError(f"clinical must be [{b}, {len(cohort_cfg.clinical_names)}], got {clin.shape}")

    cols: list[np.ndarray] = []
    if cohort_cfg.fmri_regions is not None:
        cols += list(region_summaries(fmri).numpy().astype(np.float64).reshape(b, -1).T)
    for (x0, x1), (y0, y1), (z0, z1) in cohort_cfg.region_boxes.values():
        cols.append(fmri[:, x0:x1, y0:y1, z0:z1, :].reshape(b, -1).mean(axis=1, dtype=np.float64))
    # Global moments per subject, one subject at a time (bounded float64 temporaries).
    flat = fmri.reshape(b, -1)
    mean = np.array([flat[i].mean(dtype=np.float64) for i in range(b)])
    std = np.array([flat[i].std(dtype=np.float64) for i in range(b)])
    cols += [mean, std]

    n_pred = cohort_cfg.n_predictive_snps
    g = snp.astype(np.int64)
    pred, other = g[:, :n_pred], g[:, n_pred:]
    if cohort_cfg.n_snps:
        cols += [(pred == 1).sum(1), (pred == 2).sum(1), (other == 1).sum(1), (other == 2).sum(1)]
    X = np.concatenate(
        [np.stack(cols, axis=1).astype(np.float64), pred.astype(np.float64), clin.astype(np.float64)], axis=1
    ).astype(np.float32)
    names = emt_summary_feature_names(cohort_cfg)
    assert X.shape[1] == len(names)
    return X, names


def fit_random_forest(X: np.ndarray, y: np.ndarray, n_estimators: int = 300, seed: int = 0, n_jobs: int = 1):
    """A ``RandomForestClassifier`` fitted on ``(X, y)``; ``n_jobs=1`` by default
    because trainers may already run one process per core."""
    from sklearn.ensemble import RandomForestClassifier

    rf = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)
    return rf.fit(np.asarray(X), np.asarray(y).astype(np.int64).ravel())
