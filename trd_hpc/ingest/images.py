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
   source voxels along any axis shrunk by a factor f > 1, against aliasing.  The map is a
   scale and a shift per axis, so filter and interpolation are separable: each axis is one
   small matrix (scipy's own filter and interpolation applied to unit vectors, so edges
   behave exactly as ``scipy.ndimage`` treats them) and a whole 4-D series is resampled by
   three matrix products, not frame by frame (``bench ingest``: 9x faster on a 3 mm series);
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


def axis_operator(n_src: int, n_out: int, step: float, offset: float, sigma: float) -> np.ndarray:
    """The ``(n_out, n_src)`` matrix of one axis: a Gaussian of ``sigma`` source voxels
    (``mode="nearest"``) then linear interpolation at ``offset + step * i``, zero outside
    ``[0, n_src - 1]`` -- ``scipy.ndimage.gaussian_filter1d`` and ``affine_transform``
    (``order=1, mode="constant"``) as they act on each unit vector."""
    from scipy import ndimage

    m = np.eye(n_src)
    if sigma > 0:
        m = ndimage.gaussian_filter1d(m, sigma, axis=0, mode="nearest")
    pos = offset + step * np.arange(n_out)
    inside = (pos >= 0) & (pos <= n_src - 1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_src - 1)
    hi = np.minimum(lo + 1, n_src - 1)
    w = (pos - lo)[:, None]
    return np.where(inside[:, None], m[lo] * (1 - w) + m[hi] * w, 0.0).astype(np.float32)


def resample_space(data: np.ndarray, grid, step, offset, sigma) -> np.ndarray:
    """``data`` [X, Y, Z(, T)] on ``grid`` [x, y, z(, T)]: the three axis operators applied as
    matrix products over every frame at once, z (the axis that shrinks most in fMRI) first.

    nibabel returns column-major arrays, and the result goes into row-major shards: the one
    reordering pass is made on the smaller side, so an image larger than the grid is worked
    on as its transpose [T, Z, Y, X] (read without a copy; the result comes back column-major)
    and a smaller one is made row-major first."""
    X, Y, Z = data.shape[:3]
    T = data.shape[3] if data.ndim == 4 else 1
    gx, gy, gz = (int(g) for g in grid)
    ax, ay, az = (axis_operator(n, g, st, o, sg) for n, g, st, o, sg in zip((X, Y, Z), grid, step, offset, sigma))
    if data.size <= gx * gy * gz * T:
        r = np.matmul(az, np.ascontiguousarray(data).reshape(X * Y, Z, T))  # [X*Y, gz, T]
        r = np.matmul(ay, r.reshape(X, Y, gz * T))  # [X, gy, gz*T]
        r = (ax @ r.reshape(X, gy * gz * T)).reshape(gx, gy, gz, T)
    else:
        d = np.ascontiguousarray(data.T).reshape(T, Z, Y * X)
        r = np.matmul(az, d)  # [T, gz, Y*X]
        r = np.matmul(ay, r.reshape(T * gz, Y, X))  # [T*gz, gy, X]
        r = (r.reshape(-1, X) @ ax.T).reshape(T, gz, gy, gx).T  # [gx, gy, gz, T]
    return r if data.ndim == 4 else r[..., 0]


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
    in time between the two nearest source frames (``resample``: one matrix product with the
    interpolation weights, in the series' own memory order)."""
    if temporal == "crop":
        return series[..., :frames]
    n = series.shape[-1]
    t = np.linspace(0.0, n - 1, frames) if frames > 1 else np.zeros(1)
    lo = np.floor(t).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = t - lo
    weights = np.zeros((frames, n))
    np.add.at(weights, (np.arange(frames), lo), 1 - w)
    np.add.at(weights, (np.arange(frames), hi), w)
    weights = weights.astype(np.float32)
    if series.flags.c_contiguous:
        return (series.reshape(-1, n) @ weights.T).reshape(series.shape[:-1] + (frames,))
    flat = np.ascontiguousarray(series.T).reshape(n, -1)
    return (weights @ flat).reshape((frames,) + series.shape[-2::-1]).T


def fill(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (e.g. float32 into a float16 shard buffer, any memory order) through
    torch's copy, which converts with the same rounding as numpy and several times faster."""
    import torch

    torch.from_numpy(dst).copy_(torch.from_numpy(src))


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
    from threadpoolctl import threadpool_limits

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

    # One BLAS thread: ingest's parallelism is its workers, one subject each, and OpenBLAS's
    # threads on these many mid-sized products lose badly to any other load on the cores
    # (bench ingest, 2 cores, one other busy process: 0.6 subjects/s with 2 threads, 2.3 with 1).
    with threadpool_limits(1, user_api="blas"):
        out = resample_space(data, grid, step, offset, sigma)  # space first, every frame at once
        if ndim == 4:
            if clean is not None:
                out = clean(out, grid_mask)
            out = to_frames(out, frames, temporal)  # then time, linear between the two nearest frames
    out = out.astype(np.float32, copy=False)
    if normalize:
        vals = out[grid_mask]
        sd = float(vals.std(dtype=np.float64)) if vals.size else 0.0
        if sd <= 0:
            raise IngestError(f"subject {subject}: {path}: no intensity variation inside the brain")
        out -= float(vals.mean(dtype=np.float64))  # in place: every array here is this call's own
        out /= sd
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
