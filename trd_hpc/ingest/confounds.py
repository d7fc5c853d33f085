"""Confound regression of fMRI time series with ``nilearn.signal.clean``.

The columns come from fMRIPrep's ``*_desc-confounds_timeseries.tsv`` by a named strategy (the
parts joined with ``+``) or a list of column names.  Cleaning happens on the model's grid,
after spatial resampling and before the temporal crop or resampling and the final z-score:
regression, detrending and filtering act on each voxel's time course alone, so cleaning
before or after a spatial map that is the same for every frame differs only by how the
per-voxel standardisation weighs the interpolated voxels, and the grid holds a few times
fewer voxels than the source image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trd_hpc.errors import ConfigError, IngestError

# Parts of a named strategy -> fMRIPrep's column names
STRATEGIES = {
    "motion": ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"],
    "motion24": [
        f"{base}{d}{p}"
        for base in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
        for d in ("", "_derivative1")
        for p in ("", "_power2")
    ],
    "wm": ["white_matter"],
    "csf": ["csf"],
    "global": ["global_signal"],
    "fd": ["framewise_displacement"],
}


def columns(strategy: str | list[str]) -> list[str]:
    """The TSV columns of a strategy (``motion+wm+csf+global``) or a list of columns."""
    if isinstance(strategy, list):
        if not strategy:
            raise ConfigError("confounds.strategy: an empty list regresses nothing; leave confounds out instead")
        return list(strategy)
    out: list[str] = []
    for part in strategy.split("+"):
        part = part.strip()
        if part not in STRATEGIES:
            raise ConfigError(
                f"confounds.strategy: unknown part {part!r} of {strategy!r}; parts: {', '.join(STRATEGIES)} "
                "(or a list of column names)"
            )
        out += [c for c in STRATEGIES[part] if c not in out]
    return out


def read(path: Path, cols: list[str], subject: str) -> tuple[np.ndarray, int]:
    """(confounds [frames, columns] as float64, cells filled): a cell fMRIPrep leaves empty
    ('n/a': the first frame of a derivative column) takes its column's mean."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a", ""], keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise IngestError(f"subject {subject}: {path}: cannot be read as a TSV ({' '.join(str(e).split())})") from None
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise IngestError(
            f"subject {subject}: {path}: no column(s) {', '.join(missing)} (confounds.strategy); it has "
            f"{', '.join(list(df.columns)[:12])}{' ...' if len(df.columns) > 12 else ''}"
        )
    try:
        x = df[cols].to_numpy(dtype=np.float64)
    except ValueError as e:
        raise IngestError(f"subject {subject}: {path}: a confound value is not a number ({e})") from None
    holes = np.isnan(x)
    if holes.all(axis=0).any():
        bad = [c for c, h in zip(cols, holes.all(axis=0)) if h]
        raise IngestError(f"subject {subject}: {path}: column(s) {', '.join(bad)} hold no value")
    if holes.any():
        x = np.where(holes, np.nanmean(x, axis=0, keepdims=True), x)
    return x, int(holes.sum())


def clean(series: np.ndarray, mask: np.ndarray, confounds: np.ndarray | None, cfg, t_r: float | None) -> np.ndarray:
    """``series`` [X, Y, Z, T] with every voxel of ``mask`` cleaned by ``nilearn.signal.clean``
    (the others 0)."""
    from nilearn.signal import clean as nilearn_clean

    if confounds is not None and len(confounds) != series.shape[3]:
        raise IngestError(f"{len(confounds)} confound rows for {series.shape[3]} frames")
    if (cfg.high_pass or cfg.low_pass) and not t_r:
        raise IngestError("confounds.high_pass / low_pass need the repetition time (confounds.t_r)")
    signals = series[mask].T.astype(np.float64)  # [T, voxels]
    out = nilearn_clean(
        signals,
        detrend=cfg.detrend,
        standardize=cfg.standardize,
        confounds=confounds,
        standardize_confounds=True,
        high_pass=cfg.high_pass,
        low_pass=cfg.low_pass,
        t_r=t_r,
    )
    result = np.zeros_like(series, dtype=np.float32)
    result[mask] = out.T.astype(np.float32)
    return result


def repetition_time(image: Path) -> float | None:
    """Seconds between frames: the JSON sidecar's RepetitionTime, else the NIfTI header's
    fourth zoom (when its time unit is set), else None."""
    from trd_hpc.ingest.bids import sidecar

    tr = sidecar(image).get("RepetitionTime")
    if isinstance(tr, (int, float)) and tr > 0:
        return float(tr)
    import nibabel as nib

    img = nib.load(str(image))
    zooms = img.header.get_zooms()
    unit = img.header.get_xyzt_units()[1] if hasattr(img.header, "get_xyzt_units") else "unknown"
    if len(zooms) > 3 and zooms[3] > 0 and unit in ("sec", "msec"):
        return float(zooms[3]) / (1000.0 if unit == "msec" else 1.0)
    return None


def check_files(paths: list[Path], subjects: list[str], cols: list[str], min_rows: int | None) -> None:
    """Every subject's confounds TSV has the columns (and, for a crop, the frames) asked for;
    all problems named at once."""
    problems = []
    for path, who in zip(paths, subjects):
        try:
            with open(path) as f:
                header = f.readline().rstrip("\n").split("\t")
                rows = sum(1 for line in f if line.strip())
        except OSError as e:
            problems.append(f"subject {who}: {path}: {e}")
            continue
        missing = [c for c in cols if c not in header]
        if missing:
            problems.append(f"subject {who}: {path.name}: no column(s) {', '.join(missing)}")
        elif min_rows is not None and rows < min_rows:
            problems.append(f"subject {who}: {path.name}: {rows} rows, the spec keeps {min_rows} frames")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IngestError("confounds: " + "; ".join(problems[:5]) + more)
