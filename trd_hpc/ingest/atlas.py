"""Region x time series of fMRI through an atlas (``nilearn.maskers``).

A labels image (integers, 0 the background) is read by ``NiftiLabelsMasker``: each region's
series is the mean over its voxels; a 4-D probabilistic atlas by ``NiftiMapsMasker`` (each
map a weighted region).  The atlas is resampled onto each image's grid (nearest neighbour for
labels), so it must be in the images' world space (for fMRIPrep outputs: the ``space-`` the
spec names).  A region left with no voxel in an image is an error naming it: a model's
region tokens must mean the same region in every subject.  Confounds, detrending, filtering
and standardising are the masker's own (``confounds=``, the spec's ``confounds:`` section);
without that section each region's series is z-scored over time.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from trd_hpc.errors import IngestError


def _standardize(value):
    """nilearn >= 0.13 names "no standardising" None (False is deprecated there)."""
    if value is not False:
        return value
    import nilearn

    major, minor = (int(x) for x in nilearn.__version__.split(".")[:2])
    return None if (major, minor) >= (0, 13) else False


def describe(image: Path, labels: Path | None) -> tuple[str, list[int], list[str], str]:
    """(kind "labels" | "maps", label values, region names, sha256 of the files) of an atlas."""
    import nibabel as nib

    if not image.is_file():
        raise IngestError(f"atlas.image: {image} not found")
    try:
        img = nib.load(str(image))
        data = np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001  (nibabel raises several types)
        raise IngestError(f"atlas.image: {image}: not an image nibabel can read ({e})") from None
    h = hashlib.sha256(image.read_bytes())
    if data.ndim == 4 and data.shape[3] > 1:
        kind, values = "maps", list(range(data.shape[3]))
    elif data.ndim in (3, 4):
        if not np.allclose(data, np.round(data)):
            raise IngestError(f"atlas.image: {image}: a labels atlas holds integers (a probabilistic one is 4-D)")
        kind, values = "labels", [int(v) for v in np.unique(data) if int(v) != 0]
    else:
        raise IngestError(f"atlas.image: {image}: is {data.ndim}-D; a labels atlas is 3-D, a probabilistic one 4-D")
    if not values:
        raise IngestError(f"atlas.image: {image}: holds no region (every voxel is 0)")
    names = [f"region_{v}" for v in values]
    if labels is not None:
        names = _names(labels, values, kind)
        h.update(labels.read_bytes())
    return kind, values, names, h.hexdigest()


def _names(path: Path, values: list[int], kind: str) -> list[str]:
    import pandas as pd

    if not path.is_file():
        raise IngestError(f"atlas.labels: {path} not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise IngestError(f"atlas.labels: {path}: cannot be read as a TSV ({e})") from None
    missing = [c for c in ("index", "name") if c not in df.columns]
    if missing:
        raise IngestError(
            f"atlas.labels: {path}: needs columns index and name (BIDS dseg.tsv); has {', '.join(df.columns)}"
        )
    try:
        by_index = {int(i): str(n).strip() for i, n in zip(df["index"], df["name"])}
    except ValueError:
        raise IngestError(f"atlas.labels: {path}: column 'index' holds a value that is not an integer") from None
    if kind == "maps":  # a probabilistic atlas: rows index the maps 0..N-1 (or 1..N)
        base = 0 if 0 in by_index else 1
        values = [v + base for v in values]
    unnamed = [v for v in values if v not in by_index]
    if unnamed:
        raise IngestError(
            f"atlas.labels: {path}: no name for label(s) {', '.join(map(str, unnamed[:10]))} of the atlas image"
        )
    names = [by_index[v] for v in values]
    if len(set(names)) != len(names):
        raise IngestError(f"atlas.labels: {path}: region names must be unique")
    return names


def region_series(
    bold: Path, subject: str, atlas: Path, kind: str, values: list[int], confounds=None, clean_cfg=None, t_r=None
) -> np.ndarray:
    """[regions, frames] float32 of one subject's 4-D image, regions in ``values`` order."""
    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    kw = dict(
        standardize=_standardize(clean_cfg.standardize) if clean_cfg is not None else "zscore_sample",
        detrend=clean_cfg.detrend if clean_cfg is not None else False,
        high_pass=clean_cfg.high_pass if clean_cfg is not None else None,
        low_pass=clean_cfg.low_pass if clean_cfg is not None else None,
        t_r=t_r,
        resampling_target="data",
    )
    if clean_cfg is not None and (clean_cfg.high_pass or clean_cfg.low_pass) and not t_r:
        raise IngestError(f"subject {subject}: confounds.high_pass / low_pass need the repetition time (confounds.t_r)")
    img = nib.load(str(bold))
    masker = (NiftiLabelsMasker if kind == "labels" else NiftiMapsMasker)(str(atlas), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's notes on resampling and deprecated defaults
        try:
            ts = masker.fit_transform(img, confounds=confounds)  # [T, regions present]
        except (ValueError, TypeError) as e:
            raise IngestError(
                f"subject {subject}: {bold}: region time series failed ({' '.join(str(e).split())})"
            ) from None
    if kind == "maps":
        return np.asarray(ts, dtype=np.float32).T
    ids = getattr(masker, "region_ids_", None) or {}
    got = {int(v): j for j, v in ids.items() if j != "background"}
    lost = [v for v in values if v not in got]
    if lost:
        raise IngestError(
            f"subject {subject}: {bold}: atlas region(s) {', '.join(map(str, lost[:10]))} have no voxel on this "
            "image's grid (a finer image or a coarser atlas needed, or an atlas in another space)"
        )
    return np.stack([ts[:, got[v]] for v in values]).astype(np.float32)
