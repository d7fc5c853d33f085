"""Synthetic EMT subjects (paper 000, section 2.1): 4-D fMRI, SNPs, clinical.

Label 1 is TRD, 0 non-TRD.  Subject ``i`` is TRD when ``i`` is odd, so any
cohort of even size is exactly balanced and a subject's class does not depend
on the cohort size; the stratified splits shuffle subjects anyway.
"""

from __future__ import annotations

import numpy as np
import torch

from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.data.rng import subject_streams
from trd_hpc.data.splits import three_way_split
from trd_hpc.tasks.emt.config import MODALITIES, EMTCohortConfig

CLASS_NAMES = ("non_trd", "trd")


def emt_label(index: int) -> int:
    return index % 2


def _genotypes(u: np.ndarray, probs) -> np.ndarray:
    """Genotype 0/1/2 from uniforms by inverting the cumulative distribution."""
    c0, c1 = probs[0], probs[0] + probs[1]
    return (u >= c0).astype(np.uint8) + (u >= c1).astype(np.uint8)


def make_emt_subject(cfg: EMTCohortConfig, index: int, fmri_out: np.ndarray) -> dict:
    """Fill ``fmri_out`` (cfg.fmri.shape, float16 or float32) and return the rest.

    The draws happen in a fixed order whatever the class, so changing one
    region's parameters does not shift the other draws.
    """
    label = emt_label(index)
    cls = CLASS_NAMES[label]
    rng, g = subject_streams(cfg.seed, index)

    offsets = {name: rng.normal(r.offset_mean, r.offset_sd) for name, r in cfg.regions.items()}
    snp_u = rng.random(cfg.snp.n_snps)
    clinical = rng.normal(0.0, cfg.clinical.sd, len(cfg.clinical.names))

    # Bulk noise in float32 (the sd is applied in place), region offsets added to
    # every frame inside the box, then one cast into the output buffer.
    x = torch.randn(cfg.fmri.shape, generator=g, dtype=torch.float32)
    x.mul_(cfg.fmri.noise_sd)
    for name, r in cfg.regions.items():
        if r.applies_to == cls:
            (x0, x1), (y0, y1), (z0, z1) = r.box
            x[x0:x1, y0:y1, z0:z1, :] += float(offsets[name])
    torch.from_numpy(fmri_out).copy_(x)

    n_pred = cfg.snp.n_predictive
    snp = np.empty(cfg.snp.n_snps, dtype=np.uint8)
    snp[:n_pred] = _genotypes(snp_u[:n_pred], cfg.snp.probs_trd if label else cfg.snp.probs_non_trd)
    snp[n_pred:] = _genotypes(snp_u[n_pred:], cfg.snp.probs_other)

    if label:
        for var, shift in cfg.clinical.trd_shifts.items():
            clinical[cfg.clinical.names.index(var)] += shift

    return {
        "snp": snp,
        "clinical": clinical.astype(np.float32),
        "label": np.int64(label),
        "offsets": offsets,
    }


# --------------------------------------------------------------------------- the kind
def _schema(cfg: EMTCohortConfig) -> list[Column]:
    return [
        Column("fmri", tuple(cfg.fmri.shape), cfg.fmri.dtype, True),
        *([Column("snp", (cfg.snp.n_snps,), "uint8", True)] if cfg.snp.n_snps else []),  # 0: no genotypes
        Column("clinical", (len(cfg.clinical.names),), "float32", True),
        Column("label", (), "int64", False),
        Column("subject_id", (), "int64", False),
        *([Column("present", (3,), "uint8", True, high=2)] if cfg.missing.any else []),
    ]


MISSING_STREAM = 0x6D697373  # "miss": the missing-modality draws, apart from the data's streams


def present_of(cfg: EMTCohortConfig, index: int) -> np.ndarray:
    """[fMRI, SNPs, clinical] 1 where subject ``index`` has the modality (``cohort.missing``)."""
    u = np.random.default_rng([cfg.seed, MISSING_STREAM, index]).random(3)
    rates = np.array([cfg.missing.fmri, cfg.missing.snp, cfg.missing.clinical])
    out = (u >= rates).astype(np.uint8)
    out[1] &= cfg.snp.n_snps > 0  # a cohort without genotypes: absent for everyone
    return out


def _make_subject(cfg: EMTCohortConfig, index: int, bulk_out: np.ndarray) -> dict:
    r = make_emt_subject(cfg, index, bulk_out)
    out = {"snp": r["snp"], "clinical": r["clinical"], "label": r["label"]}
    if not cfg.snp.n_snps:
        del out["snp"]  # no genotypes: no column
    if cfg.missing.any:  # the complete subject's data, then what is absent zeroed
        present = present_of(cfg, index)
        if not present[0]:
            bulk_out[...] = 0
        if not present[1] and "snp" in out:
            out["snp"] = np.zeros_like(out["snp"])
        if not present[2]:
            out["clinical"] = np.zeros_like(out["clinical"])
        out["present"] = present
    return out


def _class_count_problem(cfg: EMTCohortConfig, counts: np.ndarray) -> str | None:
    # odd ids are TRD: the two classes differ by at most one subject
    n = int(counts.sum())
    if abs(int(counts[0]) - int(counts[1])) > n % 2:
        return f"classes not balanced: {dict(zip(CLASS_NAMES, counts.tolist()))}"
    return None


KIND = CohortKind(
    name="emt",
    config_class=EMTCohortConfig,
    schema=_schema,
    label_column="label",
    class_names=lambda cfg: list(CLASS_NAMES),
    make_subject=_make_subject,
    predicted_labels=lambda cfg: np.array([emt_label(i) for i in range(cfg.n_subjects)], dtype=np.int64),
    make_splits=lambda cfg, labels: (
        three_way_split(labels, cfg.split.train, cfg.split.val, cfg.split.test, cfg.seed),
        [],
    ),
    class_count_problem=_class_count_problem,
    generator="paper 000",
    modalities=MODALITIES,  # the order of `present`
)
