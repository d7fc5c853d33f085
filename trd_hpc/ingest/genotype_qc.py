"""Genotype quality control, as PLINK 1.9 filters, on the cohort's own subjects.

``snps: {mind, geno, hwe, maf}`` apply in PLINK 1.9's order over the candidate variants
(``first: N`` or ``ids: FILE``):

1. ``mind``: a subject missing more than this fraction of the candidates' calls is dropped
   (listed in the manifest with its rate), over all subjects, before the splits are drawn;
2. ``geno``: a variant missing more than this fraction of calls;
3. ``hwe``: a variant whose Hardy-Weinberg exact test p-value (Wigginton, Cutler & Abecasis
   2005, the test PLINK runs) is below this;
4. ``maf``: a variant whose minor-allele frequency is below this.

Filters 2-4 are computed on the **training split only**, so nothing about the validation or
test subjects shapes which variants a model sees (PLINK run with ``--keep`` on the training
subjects gives the same variants: ``tests/test_genotype_qc.py`` checks it).  Unlike PLINK 1.9,
the HWE test uses every training subject whatever the .fam's phenotype column (PLINK 1.9
restricts it to controls when that column holds case/control status).
"""

from __future__ import annotations

import numpy as np

MISSING = 3
CHUNK = 20_000  # variants read at a time: [subjects, CHUNK] uint8


def _calls(geno, rows: np.ndarray, snp_ids: list[str]):
    """Genotypes of ``rows`` x ``snp_ids`` in variant chunks (uint8, 3 = missing)."""
    for start in range(0, len(snp_ids), CHUNK):
        yield start, geno.read(rows, snp_ids[start : start + CHUNK])


def subject_missingness(geno, rows: np.ndarray, snp_ids: list[str]) -> np.ndarray:
    """Fraction of missing calls per subject over ``snp_ids``."""
    missing = np.zeros(len(rows), dtype=np.int64)
    for _, x in _calls(geno, rows, snp_ids):
        missing += (x == MISSING).sum(axis=1)
    return missing / max(1, len(snp_ids))


def hwe_exact(het: int, hom1: int, hom2: int) -> float:
    """Hardy-Weinberg exact test p-value of one variant's genotype counts (Wigginton et al.
    2005): the probability, under equilibrium given the allele counts, of a heterozygote
    count at most as likely as the one observed."""
    homr, homc = min(hom1, hom2), max(hom1, hom2)
    rare = 2 * homr + het
    n = het + homr + homc
    if n == 0:
        return 1.0
    probs = np.zeros(rare + 1)
    mid = rare * (2 * n - rare) // (2 * n)
    if (rare % 2) != (mid % 2):
        mid += 1
    probs[mid] = 1.0
    h, r, c = mid, (rare - mid) // 2, n - mid - (rare - mid) // 2
    while h >= 2:
        probs[h - 2] = probs[h] * h * (h - 1) / (4.0 * (r + 1) * (c + 1))
        h, r, c = h - 2, r + 1, c + 1
    h, r, c = mid, (rare - mid) // 2, n - mid - (rare - mid) // 2
    while h <= rare - 2:
        probs[h + 2] = probs[h] * 4.0 * r * c / ((h + 2.0) * (h + 1.0))
        h, r, c = h + 2, r - 1, c - 1
    probs /= probs.sum()
    p = probs[probs <= probs[het] * (1 + 1e-7)].sum()  # ties within rounding count as as likely
    return float(min(1.0, p))


def variant_stats(geno, rows: np.ndarray, snp_ids: list[str]) -> dict[str, np.ndarray]:
    """Per variant over ``rows``: missing fraction, minor-allele frequency, HWE p-value."""
    n = len(snp_ids)
    out = {"missing": np.zeros(n), "maf": np.zeros(n), "hwe_p": np.ones(n)}
    for start, x in _calls(geno, rows, snp_ids):
        counts = np.stack([(x == g).sum(axis=0) for g in (0, 1, 2, MISSING)], axis=1)  # [chunk, 4]
        called = counts[:, :3].sum(axis=1)
        sl = slice(start, start + x.shape[1])
        out["missing"][sl] = counts[:, 3] / max(1, x.shape[0])
        a1 = (counts[:, 1] + 2 * counts[:, 2]) / np.maximum(1, 2 * called)
        out["maf"][sl] = np.minimum(a1, 1 - a1)
        out["hwe_p"][sl] = [hwe_exact(int(c[1]), int(c[0]), int(c[2])) for c in counts]
    return out


def filter_variants(geno, rows: np.ndarray, snp_ids: list[str], sel) -> tuple[list[str], dict]:
    """(variants kept, in candidate order; the QC table) of ``sel``'s geno, hwe and maf on ``rows``."""
    stats = variant_stats(geno, rows, snp_ids)
    keep = np.ones(len(snp_ids), dtype=bool)
    table: dict = {"candidates": len(snp_ids), "subjects": int(len(rows)), "removed": {}}
    for name, bad in (
        ("geno", None if sel.geno is None else stats["missing"] > sel.geno),
        ("hwe", None if sel.hwe is None else stats["hwe_p"] < sel.hwe),
        ("maf", None if sel.maf is None else stats["maf"] < sel.maf),
    ):
        if bad is None:
            continue
        gone = keep & bad
        table["removed"][name] = {
            "threshold": getattr(sel, name),
            "variants": int(gone.sum()),
            "ids": [snp_ids[j] for j in np.flatnonzero(gone)[:50]],
        }
        keep &= ~bad
    table["kept"] = int(keep.sum())
    return [s for s, k in zip(snp_ids, keep) if k], table
