"""Synthetic 3-D volumes (paper 001, sections 2.1-2.2).

Each subject is an ellipsoidal brain phantom with a prefrontal cortex and two
hippocampi whose intensity and size fall with disease severity, moved by a
random affine transform and a Gaussian random-field warp (one
``scipy.ndimage.map_coordinates`` resampling), then given voxel-wise +-5 %
intensity shifts and Gaussian noise.

Response classes: 0 non-responder (severe), 1 partial responder (moderate),
2 responder (mild).  Severity is uniform inside the class's range.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from trd_hpc.data.kinds import CohortKind, Column
from trd_hpc.data.rng import subject_numpy_stream, subject_streams
from trd_hpc.data.splits import fold_parts, stratified_folds, train_test_with_val
from trd_hpc.tasks.cnn3d.config import VolumeCohortConfig


def _grid(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] along each axis."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(g, centre, radii) -> np.ndarray:
    x, y, z = g
    d = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
    # A soft edge (about one voxel wide) so shrinking by a fraction of a voxel
    # still changes the image.
    return np.clip((1.0 - d) * 6.0, 0.0, 1.0)


# Structures in normalised coordinates (x: left-right, y: posterior-anterior,
# z: inferior-superior).
PREFRONTAL = ((0.0, 0.55, 0.15), (0.55, 0.22, 0.45))
HIPPOCAMPI = (((-0.38, -0.05, -0.35), (0.10, 0.25, 0.22)), ((0.38, -0.05, -0.35), (0.10, 0.25, 0.22)))
# Region masks at full size, for figures and tests (voxels where the structure is).
REGION_NAMES = ("prefrontal", "hippocampus")


def anatomy(shape, severity01: float, cfg: VolumeCohortConfig) -> np.ndarray:
    """The phantom before spatial transforms, for a severity in [0, 1]."""
    g = _grid(shape)
    brain = _ellipsoid(g, (0, 0, 0), (0.85, 0.9, 0.85))
    white = _ellipsoid(g, (0, 0, 0.05), (0.6, 0.65, 0.55))
    ventricles = _ellipsoid(g, (0, -0.05, 0.1), (0.18, 0.35, 0.2))
    vol = 0.55 * brain + 0.25 * white - 0.45 * ventricles

    e = cfg.effects
    pf_c, pf_r = PREFRONTAL
    pf_scale = 1.0 - e.prefrontal_shrink * severity01
    vol += (
        0.45 * (1.0 - e.prefrontal_intensity_loss * severity01) * _ellipsoid(g, pf_c, tuple(r * pf_scale for r in pf_r))
    )
    hc_scale = 1.0 - e.hippocampus_shrink * severity01
    for c, r in HIPPOCAMPI:
        vol += (
            0.6 * (1.0 - e.hippocampus_intensity_loss * severity01) * _ellipsoid(g, c, tuple(x * hc_scale for x in r))
        )
    return vol.astype(np.float32)


def region_masks(shape) -> dict[str, np.ndarray]:
    g = _grid(shape)
    return {
        "prefrontal": _ellipsoid(g, *PREFRONTAL) > 0.5,
        "hippocampus": (_ellipsoid(g, *HIPPOCAMPI[0]) > 0.5) | (_ellipsoid(g, *HIPPOCAMPI[1]) > 0.5),
    }


def _rotation(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_label_and_severity(cfg: VolumeCohortConfig, rng: np.random.Generator) -> tuple[int, float]:
    label = int(rng.choice(3, p=cfg.class_probs))
    lo, hi = cfg.severity_ranges[label]
    return label, float(rng.uniform(lo, hi))


def volume_label(cfg: VolumeCohortConfig, index: int) -> int:
    """Subject ``index``'s class without making its volume (the first draw of its stream),
    so a cohort's splits can be tried before any shard is written."""
    return sample_label_and_severity(cfg, subject_numpy_stream(cfg.seed, index))[0]


def make_volume_subject(cfg: VolumeCohortConfig, index: int, out: np.ndarray) -> dict:
    """Fill ``out`` (cfg.shape, float32) and return the labels."""
    rng, _ = subject_streams(cfg.seed, index)
    label, severity = sample_label_and_severity(cfg, rng)
    shape = cfg.shape
    vol = anatomy(shape, severity / cfg.severity_max, cfg)

    # Affine about the volume centre, in voxel units; the z axis is thin, so
    # rotations are about z mostly (small tilts about x and y).
    a = cfg.affine
    angles = np.deg2rad(rng.uniform(-a.rotation_deg, a.rotation_deg, 3) * np.array([0.3, 0.3, 1.0]))
    scale = 1.0 + rng.uniform(-a.scale, a.scale, 3)
    shift = rng.uniform(-a.translation_vox, a.translation_vox, 3) * np.array([1.0, 1.0, 0.25])
    matrix = _rotation(angles) @ np.diag(1.0 / scale)
    centre = (np.array(shape) - 1) / 2.0

    # Gaussian random field: smoothed white noise rescaled to the wanted sd.  The
    # field is smooth on the scale of `smoothness_vox`, so it is drawn on a grid
    # 4x coarser (filter width scaled to match) and upsampled: 16x less work.
    w = cfg.warp
    step = 4 if w.smoothness_vox >= 4 else 1
    coarse = tuple(max(2, -(-n // step)) for n in shape)
    disp = []
    for axis in range(3):
        f = ndimage.gaussian_filter(rng.standard_normal(coarse), w.smoothness_vox / step, mode="wrap")
        f = ndimage.zoom(f, [n / c for n, c in zip(shape, coarse)], order=1, mode="nearest", grid_mode=True)
        f *= w.amplitude_vox / (f.std() + 1e-12)
        if axis == 2:
            f *= shape[2] / shape[0]  # keep the warp proportional on the thin axis
        disp.append(f)

    idx = np.indices(shape, dtype=np.float64).reshape(3, -1) - centre[:, None]
    coords = matrix @ idx + centre[:, None] - shift[:, None]
    coords += np.stack([d.reshape(-1) for d in disp])
    warped = ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0).reshape(shape)

    warped *= 1.0 + rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, shape)
    warped += rng.normal(0.0, cfg.noise_sd, shape)
    out[...] = warped
    return {"response": np.int64(label), "severity": np.float32(severity)}


def normalize_volume(v: np.ndarray | "torch.Tensor"):  # noqa: F821
    """z-score, then rescale to [0, 1] (paper 001, section 2.2); per volume."""
    v = (v - v.mean()) / (v.std() + 1e-8)
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo + 1e-8)


# --------------------------------------------------------------------------- the kind
def _schema(cfg: VolumeCohortConfig) -> list[Column]:
    return [
        Column("volume", tuple(cfg.shape), "float32", True),
        Column("response", (), "int64", False),
        Column("severity", (), "float32", False),
        Column("subject_id", (), "int64", False),
    ]


def _splits(cfg: VolumeCohortConfig, labels: np.ndarray):
    splits = train_test_with_val(labels, cfg.split.test, cfg.split.val, cfg.seed)
    folds = stratified_folds(labels, cfg.split.folds, cfg.seed)
    for k in range(len(folds)):  # what `trd-hpc cv` will ask for
        fold_parts(folds, labels, k, cfg.split.val, cfg.seed)
    return splits, folds


def _class_count_problem(cfg: VolumeCohortConfig, counts: np.ndarray) -> str | None:
    n = int(counts.sum())
    p = np.asarray(cfg.class_probs)
    sd = np.sqrt(n * p * (1 - p))
    if (np.abs(counts - n * p) > 5 * sd + 1).any():
        return f"class counts {counts.tolist()} are far from class_probs {p.tolist()}"
    return None


def _prepare_batch(cfg: VolumeCohortConfig, out: dict, normalize: bool) -> dict:
    v = out["volume"]
    if normalize:
        flat = v.view(v.shape[0], -1)
        for j in range(v.shape[0]):
            flat[j] = normalize_volume(flat[j])
    out["volume"] = v.unsqueeze(1)  # channel axis for Conv3d
    out["severity"] = out["severity"] / float(cfg.severity_max)
    return out


KIND = CohortKind(
    name="volume",
    config_class=VolumeCohortConfig,
    schema=_schema,
    label_column="response",
    class_names=lambda cfg: list(cfg.class_names),
    make_subject=make_volume_subject,
    predicted_labels=lambda cfg: np.array([volume_label(cfg, i) for i in range(cfg.n_subjects)], dtype=np.int64),
    make_splits=_splits,
    class_count_problem=_class_count_problem,
    prepare_batch=_prepare_batch,
    generator="paper 001",
)
