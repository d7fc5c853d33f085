"""NIfTI images onto the model's voxel grid (nibabel, scipy.ndimage).

Each image is
1. read with nibabel (the frames it needs only, for ``temporal: crop``), scaled by its
   header's slope and intercept, as float32;
2. reoriented to RAS+ (``nibabel.as_closest_canonical``), so axis 0 runs left to right,
   1 posterior to anterior, 2 inferior to superior in every subject;
3. masked: a voxel is brain when its (time-averaged) intensity exceeds 10 % of the robust
   range (minimum to 98th percentile) - crude, but it finds the head in raw and in
   skull-stripped images, and only its bounding box is used;
4. resampled to the target grid over that bounding box with one isotropic voxel size (the
   box's longest side in mm over its number of voxels), centred, so anatomy keeps its
   proportions and the rest of the grid is zero; linear interpolation
   (``scipy.ndimage.affine_transform``) after a Gaussian pre-filter of sigma (f - 1) / 2
   source voxels along any axis shrunk by a factor f > 1, against aliasing.  scipy and not
   nilearn: the whole step is one affine map per image, and scipy is already a dependency;
5. in time (fMRI): the first ``frames`` frames (``crop``), or linear interpolation of the
   series onto ``frames`` points (``resample``);
6. normalised (fMRI): z-scored with the mean and standard deviation over brain voxels and
   frames, the background 0; 3-D volumes are stored as resampled and the loader applies
   paper 001's per-volume z-score then [0, 1] scaling, as for synthetic volumes.

The source affine and the target affine (grid voxel -> the image's world coordinates, mm)
are kept with every subject, so a map over the grid can be written back as NIfTI in the
subject's space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trd_hpc.errors import IngestError

BRAIN_FRACTION = 0.10
ROBUST_PERCENTILE = 98.0


@dataclass
class Header:
    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...] = ()  # the header's voxel sizes (and, 4-D, its time step)


def _load(path: Path, subject: str):
    import nibabel as nib

    if not Path(path).is_file():
        raise IngestError(f"subject {subject}: {path}: image file not found")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises several types for a file it cannot parse
        raise IngestError(
            f"subject {subject}: {path}: not an image nibabel can read ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None


def _spatial_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
    """The shape as a 3-D (ndim 3) or 4-D (ndim 4) image, trailing singleton axes dropped."""
    s = tuple(int(x) for x in shape)
    while len(s) > ndim and s[-1] == 1:
        s = s[:-1]
    return s if len(s) == ndim else None


def read_header(path: Path, subject: str, ndim: int, min_frames: int | None = None) -> Header:
    """The image's shape and affine from its header (no voxel read); IngestError naming the
    subject and file when it is unreadable, of the wrong dimensionality or too short."""
    return header_of(_load(path, subject), path, subject, ndim, min_frames)


def header_of(img, path: Path, subject: str, ndim: int, min_frames: int | None = None) -> Header:
    """``read_header`` of an image already opened (any nibabel SpatialImage; ``path`` names it)."""
    shape = _spatial_shape(img.shape, ndim)
    what = "a 4-D image (x, y, z, time)" if ndim == 4 else "a 3-D image"
    if shape is None:
        raise IngestError(f"subject {subject}: {path}: is {len(img.shape)}-D {tuple(img.shape)}; needs {what}")
    if min(shape[:3]) < 2:
        raise IngestError(f"subject {subject}: {path}: shape {shape} is too thin to resample")
    if min_frames is not None and shape[3] < min_frames:
        raise IngestError(
            f"subject {subject}: {path}: has {shape[3]} frames, the spec asks for frames: {min_frames} "
            f"(use temporal: resample, or fewer frames)"
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IngestError(f"subject {subject}: {path}: its affine is singular or not finite")
    try:
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception:  # noqa: BLE001  (a header without zooms: the report shows none)
        zooms = ()
    return Header(shape, affine, zooms)


def _read(img, path: Path, subject: str, ndim: int, frames: int | None) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    shape = _spatial_shape(img.shape, ndim)
    if shape is None:
        raise IngestError(f"subject {subject}: {path}: is {len(img.shape)}-D {tuple(img.shape)}")
    try:
        proxy = img.dataobj
        if ndim == 4 and frames and len(img.shape) == 4:
            data = np.asarray(proxy[..., :frames], dtype=np.float32)  # only the frames kept are read
        else:
            data = np.asarray(proxy[...], dtype=np.float32)
    except Exception as e:  # truncated gzip, short file
        raise IngestError(
            f"subject {subject}: {path}: voxels cannot be read ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None
    # trailing singleton axes (a 3-D image stored as x, y, z, 1) dropped
    data = data.reshape(shape[:3] + (-1,)) if ndim == 4 else data.reshape(shape)
    if not np.isfinite(data).all():
        raise IngestError(f"subject {subject}: {path}: holds NaN or infinite voxels")
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    return np.asarray(canon.dataobj, dtype=np.float32), np.asarray(canon.affine, dtype=np.float64)


def brain_mask(ref: np.ndarray) -> np.ndarray:
    lo, hi = float(ref.min()), float(np.percentile(ref, ROBUST_PERCENTILE))
    return ref > lo + BRAIN_FRACTION * (hi - lo)


def grid_mapping(mask: np.ndarray, affine: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source voxels per target voxel per axis, offset, target affine) for the bounding box of ``mask``."""
    idx = np.nonzero(mask)
    lo = np.array([a.min() for a in idx], dtype=np.float64)
    hi = np.array([a.max() for a in idx], dtype=np.float64) + 1
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    g = np.asarray(grid, dtype=np.float64)
    size_mm = float(((hi - lo) * zooms / g).max())  # isotropic target voxel
    step = size_mm / zooms
    centre = (lo + hi - 1) / 2
    offset = centre - (g - 1) / 2 * step
    vox = np.eye(4)
    vox[:3, :3] = np.diag(step)
    vox[:3, 3] = offset
    return step, offset, affine @ vox


def to_grid(
    path: Path,
    subject: str,
    grid,
    frames: int | None = None,
    temporal: str = "crop",
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image on ``grid`` [+ frames] as float32, target affine, source affine); see the module docstring."""
    return grid_image(_load(path, subject), path, subject, grid, frames, temporal, normalize)


def to_frames(series: np.ndarray, frames: int, temporal: str) -> np.ndarray:
    """A series (time on the last axis) as ``frames`` frames: its first ones (``crop``), or linear
    in time between the two nearest source frames (``resample``)."""
    if temporal == "crop":
        return series[..., :frames]
    n = series.shape[-1]
    t = np.linspace(0.0, n - 1, frames) if frames > 1 else np.zeros(1)
    lo = np.floor(t).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (t - lo).astype(np.float32)
    return series[..., lo] * (1 - w) + series[..., hi] * w


def grid_image(
    img,
    path: Path,
    subject: str,
    grid,
    frames: int | None = None,
    temporal: str = "crop",
    normalize: bool = False,
    mask_path: Path | None = None,
    clean=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``to_grid`` of an image already opened: a reader of another format that yields a
    nibabel SpatialImage (data and affine) shares every step after reading.

    ``mask_path``: a brain mask of the image's own grid (a pipeline's, e.g. fMRIPrep's
    ``desc-brain_mask``) instead of the intensity threshold.  ``clean(series, grid_mask)``:
    applied to a 4-D series on the grid before its temporal step (confound regression)."""
    from scipy import ndimage

    ndim = 3 if frames is None else 4
    source_affine = header_of(img, path, subject, ndim, frames if temporal == "crop" else None).affine
    data, affine = _read(img, path, subject, ndim, frames if temporal == "crop" else None)
    mask = _given_mask(mask_path, data.shape[:3], affine, subject) if mask_path is not None else None
    if mask is None:
        mask = brain_mask(data if ndim == 3 else data.mean(axis=3))
    if not mask.any():
        raise IngestError(f"subject {subject}: {path}: the image is constant (no voxel above the background)")
    step, offset, target_affine = grid_mapping(mask, affine, grid)
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    grid_mask = (
        ndimage.affine_transform(mask.astype(np.float32), step, offset=offset, output_shape=tuple(grid), order=1) > 0.5
    )

    def spatial(vol: np.ndarray) -> np.ndarray:
        if sigma.any():
            vol = ndimage.gaussian_filter(vol, sigma, mode="nearest")
        return ndimage.affine_transform(vol, step, offset=offset, output_shape=tuple(grid), order=1, mode="constant")

    if ndim == 4:
        # Space first, frame by frame (trilinear: 8 neighbours, not the 16 of one 4-D map),
        # then time, linear between the two nearest frames.
        moved = np.stack([spatial(data[..., k]) for k in range(data.shape[3])], axis=-1)
        if clean is not None:
            moved = clean(moved, grid_mask)
        out = to_frames(moved, frames, temporal)
    else:
        out = spatial(data)
    out = out.astype(np.float32, copy=False)
    if normalize:
        vals = out[grid_mask]
        sd = float(vals.std(dtype=np.float64)) if vals.size else 0.0
        if sd <= 0:
            raise IngestError(f"subject {subject}: {path}: no intensity variation inside the brain")
        out = (out - float(vals.mean(dtype=np.float64))) / sd
        out[~grid_mask] = 0.0
    return out, target_affine, source_affine


def _given_mask(path: Path, shape: tuple[int, ...], affine: np.ndarray, subject: str) -> np.ndarray:
    """A pipeline's brain mask, reoriented as the image was; it must share the image's grid."""
    import nibabel as nib

    m = nib.as_closest_canonical(_load(path, subject))
    if tuple(m.shape[:3]) != tuple(shape) or not np.allclose(m.affine, affine, atol=1e-3):
        raise IngestError(
            f"subject {subject}: {path}: the mask's grid {tuple(m.shape[:3])} is not its image's {tuple(shape)} "
            "(same shape and affine needed)"
        )
    return np.asarray(m.dataobj).reshape(shape) > 0


class NiftiReader:
    """The ``nifti`` image format (trd_hpc.ingest.readers): any image nibabel opens."""

    describe = (
        "RAS+ (nibabel.as_closest_canonical); the brain's bounding box (voxels above 10% of the "
        "min..98th-percentile range) resampled onto the grid with one isotropic voxel size, linear "
        "(scipy.ndimage.affine_transform) after a Gaussian anti-alias filter; per-subject 'affine' "
        "(grid -> world mm) and 'source_affine' datasets in every shard"
    )

    def header(self, path: Path, subject: str, ndim: int, min_frames: int | None = None) -> Header:
        return read_header(path, subject, ndim, min_frames)

    def to_grid(self, path, subject, grid, frames=None, temporal="crop", normalize=False, mask_path=None, clean=None):
        return grid_image(_load(path, subject), path, subject, grid, frames, temporal, normalize, mask_path, clean)
