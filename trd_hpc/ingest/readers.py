"""Ingest readers: one per file format, found by what the source is (its role) and its format.

A cohort's sources play one of three roles:

- ``table``: the participants table, one row per subject -> a pandas DataFrame of text cells
  (formats ``tsv`` and ``csv``; left out, the file's suffix decides);
- ``image``: one image per subject, named by a path template -> its header (shape, affine)
  and the image on the model's grid (format ``nifti``: anything nibabel opens);
- ``genotypes``: one fileset for the whole cohort, individuals by id -> a ``GenotypeIndex``
  (format ``plink1``: .bed/.bim/.fam through bed-reader).

A spec picks a source's format with ``formats: {SOURCE_KEY: FORMAT}`` (for example
``formats: {fmri: nifti, genotypes: plink1}``); each cohort kind's ``IngestMapping`` names its
sources and their default formats.  A format of your own is a class with the role's methods,
registered with ``register_reader(role, format, reader)`` from a plugin module
($TRD_HPC_PLUGINS): ingest, the shard writers and ``predict`` then find it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from trd_hpc.errors import ConfigError

ROLES = ("table", "image", "genotypes")


class TableReader(Protocol):
    def read(self, path: Path):  # -> pandas.DataFrame, every cell text, missing cells NaN
        ...


class ImageReader(Protocol):
    describe: str  # what it does to an image, as the manifest records it

    def header(self, path: Path, subject: str, ndim: int, min_frames: int | None = None):
        """(shape, affine) without reading voxels (trd_hpc.ingest.images.Header); IngestError naming
        the subject and the file when it is unreadable, of the wrong dimensionality or too short."""

    def to_grid(
        self,
        path: Path,
        subject: str,
        grid,
        frames: int | None = None,
        temporal: str = "crop",
        normalize: bool = False,
        mask_path: Path | None = None,
        clean=None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image on ``grid`` [+ frames] as float32, grid -> world affine, the source's affine).
        ``mask_path`` and ``clean`` come with an image found in a derivatives folder (its
        pipeline's brain mask; confound regression): trd_hpc.ingest.images.grid_image."""


class GenotypeIndex(Protocol):
    row: dict[str, int]  # subject key -> row in the fileset
    index_name: str  # the file that lists the individuals, as messages name it

    def select(self, first: int | None, ids_file: Path | None) -> list[str]: ...

    def check(self, snp_ids: list[str]) -> None: ...

    def fingerprint(self) -> str: ...

    def read(self, rows: np.ndarray, snp_ids: list[str]) -> np.ndarray:  # uint8 0/1/2, 3 = missing
        ...


class GenotypeReader(Protocol):
    def open(self, prefix: Path) -> GenotypeIndex: ...


_READERS: dict[str, dict[str, object]] = {role: {} for role in ROLES}
_builtins_loaded = False


def register_reader(role: str, fmt: str, reader: object) -> object:
    """Make ``formats: {KEY: fmt}`` read a source of ``role`` with ``reader``."""
    if role not in _READERS:
        raise ValueError(f"reader role {role!r} is not one of {', '.join(ROLES)}")
    have = _READERS[role].get(fmt)
    if have is not None and have is not reader:
        raise ValueError(f"{role} format {fmt!r} already has a reader ({type(have).__name__})")
    _READERS[role][fmt] = reader
    return reader


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from trd_hpc.ingest.genotypes import PlinkReader
    from trd_hpc.ingest.images import NiftiReader
    from trd_hpc.ingest.table import CsvReader
    from trd_hpc.registry import load_plugins

    register_reader("table", "tsv", CsvReader("\t"))
    register_reader("table", "csv", CsvReader(","))
    register_reader("image", "nifti", NiftiReader())
    register_reader("genotypes", "plink1", PlinkReader())
    load_plugins()  # readers of your own register when their module is imported


def formats(role: str) -> list[str]:
    _load_builtins()
    return sorted(_READERS[role])


def reader(role: str, fmt: str, spec_key: str):
    """The reader of ``fmt`` for a source of ``role``; ConfigError naming the spec key and the
    formats there are."""
    _load_builtins()
    got = _READERS[role].get(fmt)
    if got is None:
        raise ConfigError(
            f"spec key 'formats.{spec_key}': no {role} reader for format {fmt!r}; formats: {', '.join(formats(role))}"
        )
    return got
