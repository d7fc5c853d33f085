"""PLINK 1 binary filesets (.bed/.bim/.fam) through bed-reader.

bed-reader and not pandas-plink: it reads any subset of individuals x variants straight
from the .bed (no dask graph, no whole-matrix copy), is maintained with the PLINK format's
own test files, and reports a missing call as its own value (-127 as int8) instead of a
float NaN.  Genotypes are counts of the A1 allele (PLINK's convention, bed-reader's
default), 0/1/2; a missing call is stored as 3, a genotype value of its own that the SNP
embedding learns (never silently 0).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from trd_hpc.errors import IngestError
from trd_hpc.ingest.table import subject_key

MISSING = 3


def _files(prefix: Path) -> dict[str, Path]:
    prefix = Path(prefix)
    base = prefix.with_suffix("") if prefix.suffix in (".bed", ".bim", ".fam") else prefix
    files = {ext: Path(f"{base}.{ext}") for ext in ("bed", "bim", "fam")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise IngestError(f"genotypes {prefix}: PLINK file(s) not found: {', '.join(missing)}")
    return files


@lru_cache(maxsize=8)
def _open(bed: str):
    from bed_reader import open_bed

    try:
        return open_bed(bed, num_threads=1)
    except Exception as e:  # bed-reader raises ValueError / its own errors for a bad header or .fam/.bim
        raise IngestError(f"{bed}: not a PLINK .bed fileset bed-reader can read ({' '.join(str(e).split())})") from None


class Genotypes:
    """Index of a fileset: individuals by IID (as subject keys), variants by id."""

    def __init__(self, prefix: Path):
        self.files = _files(prefix)
        self.bed = _open(str(self.files["bed"]))
        try:
            iid = [str(x) for x in self.bed.iid]
            self.sid = [str(x) for x in self.bed.sid]
        except Exception as e:
            raise IngestError(f"{self.files['fam']}: cannot be read ({' '.join(str(e).split())})") from None
        self.row: dict[str, int] = {}
        dups = []
        for i, v in enumerate(iid):
            k = subject_key(v)
            if k in self.row:
                dups.append(v)
            self.row[k] = i
        if dups:
            raise IngestError(f"{self.files['fam']}: IIDs {', '.join(dups[:5])} appear more than once")
        self._check_bed_size(len(iid), len(self.sid))
        self.index_name = self.files["fam"].name

    def _check_bed_size(self, n_ind: int, n_var: int) -> None:
        """A SNP-major .bed holds 3 magic bytes, then ceil(individuals / 4) bytes per variant.

        A line added to or deleted from the .fam or .bim in the middle shifts every later
        genotype onto another individual or variant; bed-reader reads such a fileset without
        complaint, so its size is checked against the two files' line counts."""
        bed = self.files["bed"]
        want = 3 + n_var * ((n_ind + 3) // 4)
        have = bed.stat().st_size
        if have != want:
            raise IngestError(
                f"{bed}: {have} bytes, but the {n_ind} individuals of {self.files['fam'].name} and the {n_var} "
                f"variants of {self.files['bim'].name} need {want}: a line added to or removed from the .fam or "
                ".bim (or a truncated .bed); every later genotype would be read for the wrong individual or variant"
            )

    def check(self, snp_ids: list[str]) -> None:
        """The unused 2-bit slots closing each variant's last byte hold 00 in a PLINK .bed.

        A .fam line removed from a fileset of N individuals (N not one more than a multiple
        of 4) leaves the .bed's size as it was, and the last individual's genotypes then
        sit in those slots: non-zero there (on any of the selected variants) is the sign."""
        n_ind, n_var = len(self.row), len(self.sid)
        spare = (-n_ind) % 4
        if not spare:
            return
        per_var = (n_ind + 3) // 4
        index = {s: j for j, s in enumerate(self.sid)}
        cols = np.array(sorted(index[s] for s in snp_ids), dtype=np.int64)
        last = np.memmap(self.files["bed"], dtype=np.uint8, mode="r", offset=3, shape=(n_var, per_var))[cols, -1]
        used_bits = 2 * (4 - spare)
        bad = np.flatnonzero(np.asarray(last) >> used_bits)
        if len(bad):
            shown = ", ".join(self.sid[cols[j]] for j in bad[:3])
            raise IngestError(
                f"{self.files['bed']}: genotypes beyond the {n_ind} individuals of {self.files['fam'].name} "
                f"(in the padding of variant(s) {shown}): a line removed from the .fam? every later individual's "
                "genotypes would belong to someone else"
            )

    def _duplicated(self, ids) -> list[str]:
        """Those of ``ids`` that more than one .bim line names, with the lines."""
        where: dict[str, list[int]] = {}
        for j, s in enumerate(self.sid):
            where.setdefault(s, []).append(j + 1)
        return [f"{s} (lines {', '.join(map(str, where[s][:3]))})" for s in dict.fromkeys(ids) if len(where[s]) > 1]

    def fingerprint(self) -> str:
        """sha256 of the .fam and .bim: which individuals and variants, in which order."""
        h = hashlib.sha256()
        for ext in ("fam", "bim"):
            with open(self.files[ext], "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(str(self.files["bed"].stat().st_size).encode())
        return h.hexdigest()

    def select(self, first: int | None, ids_file: Path | None) -> list[str]:
        """The variant ids the spec's ``snps:`` names, in that order."""
        if first is not None:
            if first > len(self.sid):
                raise IngestError(f"{self.files['bim']}: holds {len(self.sid)} variants, snps.first asks for {first}")
            dups = self._duplicated(self.sid[:first])
            if dups:
                raise IngestError(
                    f"{self.files['bim']}: variant id(s) named on more than one line: {', '.join(dups[:5])}; a "
                    "model's SNP columns are found by id, so each must be unique (rename them, e.g. CHR:POS:A1:A2)"
                )
            return self.sid[:first]
        if not ids_file.is_file():
            raise IngestError(f"snps.ids: {ids_file} not found")
        want = [ln.strip() for ln in ids_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not want:
            raise IngestError(f"snps.ids: {ids_file} lists no variant id")
        index = {s: j for j, s in enumerate(self.sid)}
        unknown = [s for s in want if s not in index]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise IngestError(f"snps.ids: {ids_file}: {', '.join(unknown[:5])}{more} not in {self.files['bim']}")
        if len(set(want)) != len(want):
            raise IngestError(f"snps.ids: {ids_file} lists a variant twice")
        dups = self._duplicated(want)
        if dups:
            raise IngestError(
                f"{self.files['bim']}: variant id(s) of {ids_file.name} named on more than one line: "
                f"{', '.join(dups[:5])}; which one is meant cannot be told"
            )
        return want

    def read(self, rows: np.ndarray, snp_ids: list[str]) -> np.ndarray:
        """Genotypes [len(rows), len(snp_ids)] as uint8 0/1/2, 3 where missing."""
        index = {s: j for j, s in enumerate(self.sid)}
        cols = np.array([index[s] for s in snp_ids], dtype=np.int64)
        x = self.bed.read(index=np.s_[np.asarray(rows, dtype=np.int64), cols], dtype="int8", order="C")
        out = x.astype(np.uint8)
        out[x < 0] = MISSING
        if (out > MISSING).any():
            raise IngestError(f"{self.files['bed']}: a genotype outside 0..2")
        return out


class PlinkReader:
    """The ``plink1`` genotype format (trd_hpc.ingest.readers): a .bed/.bim/.fam fileset."""

    def open(self, prefix: Path) -> Genotypes:
        return Genotypes(prefix)
