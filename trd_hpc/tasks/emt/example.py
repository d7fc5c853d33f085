"""The example folder of paper 000 to ingest (``trd-hpc example-data DIR --task emt``): real
files that come with nibabel and bed-reader laid out as a study would (trd_hpc.ingest.example)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from trd_hpc.ingest.example import FUNCTIONAL, PLINK, copy_image, write_table


def emt_folder(root: Path, n: int = 24, spec_extra: dict | None = None) -> Path:
    """A BIDS-like EMT cohort of ``n`` subjects plus one without genotypes; returns the spec."""
    if not 1 <= n <= 100:
        raise ValueError(f"the example genotypes hold 100 individuals; n={n}")
    root.mkdir(parents=True, exist_ok=True)
    keys = [f"iid_{i}" for i in range(n)] + ["nogeno1"]
    # the table lists subjects in another order than the .fam, ids with and without 'sub-'
    order = sorted(range(len(keys)), key=lambda i: (i * 7) % len(keys))
    rows = []
    for i in order:
        k = keys[i]
        copy_image(FUNCTIONAL[(i // 2) % 2], root / f"sub-{k}" / "func" / f"sub-{k}_task-rest_bold.nii.gz")
        age = "n/a" if i == 3 else 20 + (i * 3) % 40
        hamd = "" if i == 5 else 10 + (i * 5) % 20
        rows.append([f"sub-{k}" if i % 3 else k, "yes" if i % 2 else "no", age, hamd, 1 + i % 9, f"site{i % 3}"])
    write_table(root / "participants.tsv", ["participant_id", "trd", "age", "hamd", "illness_years", "site"], rows)
    gdir = root / "genotypes"
    gdir.mkdir(exist_ok=True)
    for ext in ("bed", "bim", "fam"):
        shutil.copyfile(f"{PLINK}.{ext}", gdir / f"cohort.{ext}")
    spec = {
        "task": "emt",
        "table": "participants.tsv",
        "id_column": "participant_id",
        "label_column": "trd",
        "labels": ["no", "yes"],
        "clinical_columns": ["age", "hamd", "illness_years"],
        "clinical_missing": "impute",
        "fmri": "sub-{id}/func/sub-{id}_task-rest_bold.nii.gz",
        "genotypes": "genotypes/cohort",
        "snps": {"first": 60},
        "grid": [12, 12, 8],
        "frames": 10,
        "temporal": "resample",
        "on_missing": "drop",
        "subjects_per_shard": 8,
        **(spec_extra or {}),
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


SPACE = "MNI152NLin2009aSym"  # the template nilearn ships (mni_icbm152_*_tal_nlin_sym_09a)
TR = 2.0
MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def _mni(voxel_mm: int = 8):
    """nilearn's MNI152 2009a T1, grey- and white-matter maps at ``voxel_mm`` (block means of
    the shipped 1 mm images), and the affine of that grid."""
    import nibabel as nib
    import nilearn
    import numpy as np

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    out = []
    for name in ("t1", "gm", "wm"):
        img = nib.load(str(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
        a = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        s = [d // voxel_mm for d in a.shape]
        a = a[: s[0] * voxel_mm, : s[1] * voxel_mm, : s[2] * voxel_mm]
        out.append(a.reshape(s[0], voxel_mm, s[1], voxel_mm, s[2], voxel_mm).mean(axis=(1, 3, 5)))
    affine = img.affine.copy()
    affine[:3, :3] *= voxel_mm
    affine[:3, 3] += (voxel_mm - 1) / 2  # block centres
    return (*out, affine)


def fmriprep_folder(
    root: Path,
    n: int = 24,
    frames: int = 40,
    spec_extra: dict | None = None,
    atlas: bool = False,
    voxel_mm: int = 8,
) -> Path:
    """A study whose fMRI comes as fMRIPrep writes its derivatives, made from nilearn's MNI152
    template: per subject ``derivatives/fmriprep/sub-<id>/func/`` holds the preprocessed BOLD
    (``space-MNI152NLin2009aSym_desc-preproc_bold.nii.gz``, ``voxel_mm`` mm, ``frames`` frames, TR 2 s) with
    its JSON sidecar, the brain mask and ``desc-confounds_timeseries.tsv`` with fMRIPrep's
    column names.  Each BOLD series carries a motion artefact (a global intensity change that
    follows ``trans_x``) and, for the TRD subjects, a slow oscillation in one grey-matter box;
    genotypes and the participants table as in ``emt_folder``.  Returns the spec, which
    regresses motion, white matter and CSF out (``confounds:``).

    ``atlas/octants_dseg.nii.gz`` (+ ``.tsv``) is a labels atlas of the brain's 8 octants on the
    same grid (the oscillating box lies in ``left_anterior_superior``); with ``atlas`` the spec
    names it, and the cohort holds region x time series."""
    import json

    import numpy as np

    if not 1 <= n <= 100:
        raise ValueError(f"the example genotypes hold 100 individuals; n={n}")
    t1, gm, wm, affine = _mni(voxel_mm)
    brain = t1 > 0.15 * t1.max()
    csf = brain & (gm < 0.2) & (wm < 0.2)
    box = np.zeros(brain.shape, dtype=bool)
    x, y, z = (d // 2 for d in brain.shape)
    r = 8 / voxel_mm  # the box's size in 8 mm voxels
    box[x - round(5 * r) : x - round(r), y + round(r) : y + round(5 * r), z : z + round(3 * r)] = (
        True  # left, anterior, superior
    )
    box &= gm > 0.3
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True, exist_ok=True)
    (deriv / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "fMRIPrep-layout example (trd-hpc example-data)",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "trd-hpc example-data", "Description": "laid out as fMRIPrep writes it"}],
            },
            indent=1,
        )
    )
    masks = {"brain": brain, "box": box, "wm": (wm > 0.5) & ~box, "csf": csf}
    rows = []
    for i in range(n):
        k = f"{i + 1:03d}"  # BIDS labels are alphanumeric: the .fam's IIDs are renamed to match below
        _fmriprep_subject(deriv / f"sub-{k}" / "func", f"sub-{k}", i, t1, masks, affine, frames, voxel_mm)
        rows.append([f"sub-{k}", "yes" if i % 2 else "no", 20 + (i * 3) % 40, 10 + (i * 5) % 20, f"site{i % 3}"])
    write_table(root / "participants.tsv", ["participant_id", "trd", "age", "hamd", "site"], rows)
    _octant_atlas(root / "atlas", brain, affine)
    _bids_labelled_genotypes(root / "genotypes")
    spec = {
        "task": "emt",
        "table": "participants.tsv",
        "label_column": "trd",
        "labels": ["no", "yes"],
        "clinical_columns": ["age", "hamd"],
        "fmri": {"derivatives": "derivatives/fmriprep", "task": "rest", "space": SPACE, "desc": "preproc"},
        # no global signal: the example's one effect is a large part of what is left of it once
        # motion is accounted for, and regressing it would remove the effect from every region
        "confounds": {"strategy": "motion+wm+csf", "detrend": True, "standardize": "zscore_sample"},
        "genotypes": "genotypes/cohort",
        "snps": {"first": 60},
        "grid": [12, 12, 8],
        "frames": frames,
        "subjects_per_shard": 8,
        **({"atlas": {"image": "atlas/octants_dseg.nii.gz", "labels": "atlas/octants_dseg.tsv"}} if atlas else {}),
        **(spec_extra or {}),
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _fmriprep_subject(func: Path, sub: str, i: int, t1, masks: dict, affine, frames: int, voxel_mm: int = 8) -> None:
    """One subject's preprocessed BOLD, JSON sidecar, brain mask and confounds TSV."""
    import json

    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(1000 + i)
    brain, box = masks["brain"], masks["box"]
    motion = {c: rng.normal(0, 0.05 if c.startswith("trans") else 0.001, frames).cumsum() for c in MOTION}
    series = t1[..., None] * (1.0 + 0.3 * motion["trans_x"][None, None, None, :])  # the artefact
    series = series + rng.normal(0, 0.01, series.shape).astype(np.float32) * brain[..., None]
    if i % 2:  # TRD: a 0.05 Hz oscillation in the box
        t = np.arange(frames) * TR
        series[box] += 0.2 * np.sin(2 * np.pi * 0.05 * t + rng.uniform(0, 2 * np.pi))[None, :]
    series = (series * brain[..., None] * 1000).astype(np.float32)
    func.mkdir(parents=True, exist_ok=True)
    stem = f"{sub}_task-rest_space-{SPACE}"
    img = nib.Nifti1Image(series, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((float(voxel_mm),) * 3 + (TR,))
    nib.save(img, str(func / f"{stem}_desc-preproc_bold.nii.gz"))
    (func / f"{stem}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": TR, "TaskName": "rest"}))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(func / f"{stem}_desc-brain_mask.nii.gz"))
    conf = {
        **motion,
        "white_matter": series[masks["wm"]].mean(axis=0),
        "csf": series[masks["csf"]].mean(axis=0),
        "global_signal": series[brain].mean(axis=0),
    }
    fd = np.abs(np.diff(np.stack([motion[c] for c in MOTION]), axis=1)).sum(axis=0)
    lines = ["\t".join([*conf, "framewise_displacement"])]
    for f in range(frames):
        cells = [repr(float(conf[c][f])) for c in conf] + ["n/a" if f == 0 else repr(float(fd[f - 1]))]
        lines.append("\t".join(cells))
    (func / f"{sub}_task-rest_desc-confounds_timeseries.tsv").write_text("\n".join(lines) + "\n")


def _bids_labelled_genotypes(gdir: Path) -> None:
    """bed-reader's example fileset with FID and IID renamed 001..100 (BIDS labels)."""
    gdir.mkdir(parents=True, exist_ok=True)
    for ext in ("bed", "bim"):
        shutil.copyfile(f"{PLINK}.{ext}", gdir / f"cohort.{ext}")
    fam = []
    for j, line in enumerate(Path(f"{PLINK}.fam").read_text().splitlines()):
        cols = line.split()
        cols[0] = cols[1] = f"{j + 1:03d}"
        fam.append(" ".join(cols))
    (gdir / "cohort.fam").write_text("\n".join(fam) + "\n")


def _octant_atlas(folder: Path, brain, affine) -> None:
    """A labels atlas (BIDS dseg) of the brain mask's 8 octants, numbered 1..8."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(brain.shape, dtype=np.int16)
    half = [d // 2 for d in brain.shape]
    names = []
    for i, xn in enumerate(("left", "right")):
        for j, yn in enumerate(("posterior", "anterior")):
            for k, zn in enumerate(("inferior", "superior")):
                value = 1 + 4 * i + 2 * j + k
                sl = tuple(slice(0, h) if b == 0 else slice(h, None) for b, h in zip((i, j, k), half))
                part = np.zeros(brain.shape, dtype=bool)
                part[sl] = True
                labels[part & brain] = value
                names.append((value, f"{xn}_{yn}_{zn}"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / "octants_dseg.nii.gz"))
    rows = "\n".join(f"{v}\t{n}" for v, n in sorted(names))
    (folder / "octants_dseg.tsv").write_text("index\tname\n" + rows + "\n")
