"""`trd-hpc ingest` on real files no one here wrote (nibabel's and bed-reader's example data,
see tests/real_data.py): ingest -> cohort validate -> train for both tasks, the alignment
of every modality to its subject, and each bad input's error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from bed_reader import open_bed

from tests.conftest import REPO, cli, snapshot
from trd_hpc.cli import main
from trd_hpc.data.dataset import CohortDataset
from trd_hpc.data.manifest import load_manifest
from trd_hpc.data.validate import validate_cohort_dir
from trd_hpc.ingest.example import ANATOMICAL, copy_image
from trd_hpc.tasks.cnn3d.example import cnn3d_folder
from trd_hpc.tasks.emt.example import emt_folder


def _shards(root: Path) -> dict[str, np.ndarray]:
    """Every dataset of every shard, concatenated in subject order."""
    out: dict[str, list] = {}
    for p in sorted(root.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for k in f:
                out.setdefault(k, []).append(f[k][...])
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def emt_ingested(tmp_path_factory):
    src = tmp_path_factory.mktemp("emt_src")
    spec = emt_folder(src)
    out = src.parent / (src.name + "_cohort")
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert "24 subjects, 1 dropped" in r.stdout
    return spec, out


@pytest.fixture(scope="module")
def cnn_ingested(tmp_path_factory):
    src = tmp_path_factory.mktemp("cnn_src")
    spec = cnn3d_folder(src, spec_extra={"site_column": "site"})
    out = src.parent / (src.name + "_cohort")
    cli("ingest", str(spec), "--out", str(out), "--workers", "2", "--quiet")
    return spec, out


def test_emt_subjects_are_aligned_across_modalities(emt_ingested):
    spec, out = emt_ingested
    src = spec.parent
    table = pd.read_csv(src / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    m = load_manifest(out)
    assert m.labelled and m.kind == "ingested_emt" and m.n_subjects == 24
    assert m.raw["source"]["dropped"] == [
        {"participant_id": "nogeno1", "reason": "no genotypes (IID not in cohort.fam)"}
    ]
    a = _shards(out)
    kept = table[table.participant_id != "nogeno1"].reset_index(drop=True)
    # one row per subject, in table order, traceable by the id as written in the table
    assert [p.decode() for p in a["participant_id"]] == kept.participant_id.tolist()
    assert a["label"].tolist() == [int(v == "yes") for v in kept.trd]
    # genotypes matched by IID although the table's order is not the .fam's
    bed = open_bed(src / "genotypes" / "cohort.bed")
    fam_row = {iid: i for i, iid in enumerate(bed.iid)}
    rows = [fam_row[p.removeprefix("sub-")] for p in kept.participant_id]
    assert rows != sorted(rows)
    want = bed.read(index=np.s_[rows, :60], dtype="int8")
    assert np.array_equal(a["snp"] == 3, want < 0) and (want < 0).any()  # a missing call is its own value
    assert np.array_equal(a["snp"][want >= 0], want[want >= 0])
    assert m.raw["source"]["snp_ids"] == [str(s) for s in bed.sid[:60]]
    # clinical values as written, a missing one NaN; the loader standardises with the training split only
    raw = kept[["age", "hamd", "illness_years"]].replace({"n/a": np.nan, "": np.nan}).astype(float).to_numpy()
    assert np.array_equal(np.isnan(a["clinical"]), np.isnan(raw)) and np.isnan(raw).sum() == 2
    np.testing.assert_allclose(a["clinical"][~np.isnan(raw)], raw[~np.isnan(raw)], rtol=1e-6)
    train = np.asarray(m.splits["train"])
    mean, sd = np.nanmean(raw[train], axis=0), np.nanstd(raw[train], axis=0)
    ds = CohortDataset(out, "all")
    b = ds.__getitems__(list(range(len(ds))))
    ds.close()
    np.testing.assert_allclose(b["clinical"].numpy(), np.nan_to_num((raw - mean) / sd, nan=0.0), rtol=1e-5, atol=1e-6)
    assert "participant_id" not in b and "affine" not in b  # tracing columns stay out of batches
    # images: the grid the spec asks for, z-scored; affines to write maps back into each subject's space
    assert a["fmri"].shape == (24, 12, 12, 8, 10) and a["fmri"].dtype == np.float16
    for j, pid in enumerate(kept.participant_id[:4]):
        k = pid.removeprefix("sub-")
        img = nib.load(src / f"sub-{k}" / "func" / f"sub-{k}_task-rest_bold.nii.gz")
        np.testing.assert_allclose(a["source_affine"][j], img.affine)
        assert nib.aff2axcodes(a["affine"][j]) == ("R", "A", "S")
    f = out.parent / "map.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 8), np.float32), a["affine"][0]), f)
    np.testing.assert_allclose(nib.load(f).affine, a["affine"][0], atol=1e-5)
    assert validate_cohort_dir(out, progress=False) == []


def test_emt_config_trains_on_an_ingested_cohort_as_it_is(emt_ingested, tmp_path):
    """configs/emt_tiny.yaml (100 SNPs, 15 clinical variables, 12x12x8x10 synthetic) on a
    cohort of 60 SNPs and 3 clinical columns: the manifest describes the data."""
    spec, out = emt_ingested
    run = tmp_path / "run"
    cli(
        "train",
        "configs/emt_tiny.yaml",
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={out}",
        "train.max_epochs=1",
        "tracking.wandb=false",
    )
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["cohort"]["kind"] == "ingested_emt" and len(cfg["cohort"]["snp_ids"]) == 60
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["test.auc"] <= 1 and "baselines.random_forest.auc" in m
    assert (run / "baselines" / "late_fusion_mlp" / "metrics.json").exists()
    # The bundle is what gets shared: no participant data beyond what its card states (the
    # run's own config.yaml keeps the full record, dropped subject and study folder included).
    assert "nogeno1" in (run / "config.yaml").read_text()
    for f in sorted((run / "bundle").iterdir()):
        text = f.read_bytes()
        assert b"nogeno1" not in text, f"{f.name} names a dropped participant"
        assert str(spec.parent).encode() not in text and str(out).encode() not in text, f"{f.name} holds a path"
    from trd_hpc.bundle import load_bundle

    b = load_bundle(run)
    assert b.cfg.cohort.resolved.dropped == [] and b.cfg.data.cohort == out.name and b.build_model() is not None
    # resuming the finished run with the same command finds the same config
    r = cli(
        "train",
        "configs/emt_tiny.yaml",
        "--out",
        str(run),
        "--quiet",
        "--resume",
        "auto",
        "--no-eval",
        f"data.cohort={out}",
        "train.max_epochs=1",
        "tracking.wandb=false",
    )
    assert r.returncode == 0


def test_cnn3d_ingest_train_and_cv_with_site_grouped_splits(cnn_ingested, tmp_path):
    spec, out = cnn_ingested
    m = load_manifest(out)
    assert m.kind == "ingested_volume" and m.n_subjects == 30
    sites = pd.read_csv(spec.parent / "participants.csv", dtype=str).set_index("participant_id")["site"]
    a = _shards(out)
    site = np.array([sites[p.decode()] for p in a["participant_id"]])
    parts = [set(site[m.splits[k]]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # no site in two splits
    fold_sites = [set(site[f]) for f in m.folds]
    assert all(not (x & y) for i, x in enumerate(fold_sites) for y in fold_sites[i + 1 :])
    tr, va = (set(site[m.subjects(f"fold:0:{p}")]) for p in ("train", "val"))
    assert tr and va and not tr & va  # a fold's validation part is whole sites too
    assert a["volume"].shape == (30, 24, 24, 8) and np.isfinite(a["volume"]).all()
    assert sorted(np.unique(a["response"]).tolist()) == [0, 1, 2]
    src0 = nib.load(ANATOMICAL[0])
    j = [p.decode() for p in a["participant_id"]].index("sub-00")
    np.testing.assert_allclose(a["source_affine"][j], src0.affine)
    assert validate_cohort_dir(out, progress=False) == []
    run = tmp_path / "run"
    cli(
        "train",
        "configs/cnn3d_tiny.yaml",
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={out}",
        "train.max_epochs=1",
        "tracking.wandb=false",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test.severity_mae" in metrics
    cv = tmp_path / "cv"
    folds = len(m.folds)
    cli(
        "cv",
        "configs/cnn3d_tiny.yaml",
        "--out",
        str(cv),
        "--fold",
        "0",
        "--quiet",
        f"data.cohort={out}",
        "train.max_epochs=1",
        "tracking.wandb=false",
    )
    assert (cv / "fold-0" / "metrics.json").exists() and folds == 5


def test_rerun_keeps_shards_remakes_a_broken_one_and_another_spec_is_refused(tmp_path):
    spec = cnn3d_folder(tmp_path / "src", n=18, spec_extra={"split": {"test": 0.2, "val": 0.2, "folds": 3}})
    out = tmp_path / "cohort"
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    before = _shards(out)
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert "kept 3 verified" in r.stdout
    p = out / "shard-00001.h5"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert "remade 1" in r.stdout and "kept 2" in r.stdout
    assert all(np.array_equal(before[k], v) for k, v in _shards(out).items())
    # the same directory from an edited table: refused, nothing touched
    table = spec.parent / "participants.csv"
    text = table.read_text()
    assert "sub-03,non," in text
    table.write_text(text.replace("sub-03,non,", "sub-03,partial,"))
    snap = snapshot(out)
    r = cli("ingest", str(spec), "--out", str(out), "--quiet", check=False)
    assert r.returncode != 0 and "not this cohort" in r.stderr and "table_sha256" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and snapshot(out) == snap


def test_unlabelled_cohort_ingests_and_train_refuses_it(tmp_path):
    spec = cnn3d_folder(tmp_path / "src", n=9)
    d = yaml.safe_load(spec.read_text())
    for k in ("response_column", "severity_column", "labels"):
        d.pop(k)
    spec.write_text(yaml.safe_dump(d))
    out = tmp_path / "cohort"
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    m = load_manifest(out)
    assert not m.labelled and m.splits == {"train": [], "val": [], "test": list(range(9))}
    assert (m.labels() == -1).all() and validate_cohort_dir(out, progress=False) == []
    r = cli("train", "configs/cnn3d_tiny.yaml", "--out", str(tmp_path / "run"), f"data.cohort={out}", check=False)
    assert r.returncode == 2 and "is unlabelled" in r.stderr and "predicted" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ bad inputs
def _edit_table(spec: Path, fn) -> None:
    t = spec.parent / "participants.tsv"
    t.write_text(fn(t.read_text()))


def _bad_3d(spec: Path) -> None:
    copy_image(ANATOMICAL[0], spec.parent / "sub-iid_2" / "func" / "sub-iid_2_task-rest_bold.nii.gz")


def _bad_garbage(spec: Path) -> None:
    (spec.parent / "sub-iid_4" / "func" / "sub-iid_4_task-rest_bold.nii.gz").write_bytes(b"not an image" * 50)


def _set(**kw):
    def f(spec: Path) -> None:
        d = yaml.safe_load(spec.read_text())
        d.update(kw)
        spec.write_text(yaml.safe_dump(d))

    return f


def _no_image(spec: Path) -> None:
    (spec.parent / "sub-iid_6" / "func" / "sub-iid_6_task-rest_bold.nii.gz").unlink()
    _set(on_missing="error")(spec)


def _edit_lines(path: Path, fn) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(fn(lines)))


def _bim_duplicate(spec: Path) -> None:
    def dup(lines):
        f = lines[4].split("\t")
        f[1] = lines[1].split("\t")[1]  # line 5 names line 2's variant
        return lines[:4] + ["\t".join(f)] + lines[5:]

    _edit_lines(spec.parent / "genotypes" / "cohort.bim", dup)


def _outside(key: str, value: str):
    def f(spec: Path) -> None:
        (spec.parent.parent / "private.txt").write_text("secret-line-1\nsecret-line-2\n")
        _set(**{key: value})(spec)

    return f


BAD = {
    "3-D image where 4-D is needed": (
        _bad_3d,
        ["subject sub-iid_2", "sub-iid_2_task-rest_bold.nii.gz", "needs a 4-D image"],
    ),
    "file nibabel cannot read": (_bad_garbage, ["subject sub-iid_4", "sub-iid_4_task-rest_bold.nii.gz", "nibabel can"]),
    "missing image, on_missing error": (_no_image, ["iid_6 (line", "no fmri image", "nogeno1", "on_missing: drop"]),
    "absent from the genotypes": (_set(on_missing="error"), ["nogeno1 (line", "no genotypes"]),
    "duplicate ids": (
        lambda s: _edit_table(s, lambda t: t + "sub-iid_1\tno\t30\t12\t2\tsite1\n"),
        ["column 'participant_id' has duplicate subjects", "'sub-iid_1'"],
    ),
    "unknown label value": (
        lambda s: _edit_table(s, lambda t: t.replace("\tyes\t", "\tmaybe\t", 1)),
        ["column 'trd' holds 'maybe' on line(s) ", "allowed: the values named in 'labels' (no, yes)"],
    ),
    "label column missing": (_set(label_column="response"), ["column 'response' (spec key 'label_column') not found"]),
    "clinical value missing, clinical_missing error": (
        _set(clinical_missing="error"),
        ["missing clinical values: 'age' on line(s) ", "clinical_missing: impute"],
    ),
    "non-numeric clinical value": (
        lambda s: _edit_table(s, lambda t: t.replace("\t1\tsite", "\tone\tsite", 1)),
        ["column 'illness_years' holds non-numbers 'one' on line(s) "],
    ),
    "unknown variant id": (
        lambda s: ((s.parent / "snps.txt").write_text("1:1:A:C\nrs_nope\n"), _set(snps={"ids": "snps.txt"})(s)),
        ["rs_nope", "not in", "cohort.bim"],
    ),
    "too few frames to crop": (_set(temporal="crop", frames=10), ["has 2 frames", "temporal: resample"]),
    # the ingest rows of the trust audit
    "every subject one class": (
        lambda s: _edit_table(s, lambda t: t.replace("\tyes\t", "\tno\t")),
        ["column 'trd'", "no subject of class(es) yes", "no: 8, yes: 0", "a model needs subjects of every class"],
    ),
    "a variant id twice in the .bim": (_bim_duplicate, ["cohort.bim", "more than one line", "sid_1 (lines 2, 5)"]),
    "a .fam line deleted in the middle": (
        lambda s: _edit_lines(s.parent / "genotypes" / "cohort.fam", lambda ls: ls[:50] + ls[51:]),
        ["cohort.bed", "beyond the 99 individuals of cohort.fam", "a line removed from the .fam"],
    ),
    "a .bim line deleted (the .bed size does not match)": (
        lambda s: _edit_lines(s.parent / "genotypes" / "cohort.bim", lambda ls: ls[:70] + ls[71:]),
        ["cohort.bed: 2503 bytes", "99 variants of cohort.bim need 2478", "a line added to or removed"],
    ),
    "an fmri template without {id}": (
        _set(fmri="sub-iid_1/func/sub-iid_1_task-rest_bold.nii.gz"),
        ["spec key 'fmri'", "has no {id}", "every subject would get the same image"],
    ),
    "a clinical value beyond float32": (
        lambda s: _edit_table(s, lambda t: t.replace("\t1\tsite", "\t1e300\tsite", 1)),
        ["column 'illness_years' holds 1e+300 on line(s) ", "beyond float32's range"],
    ),
    "snps.ids outside the study folder": (
        _outside("snps", {"ids": "../private.txt"}),
        ["spec key 'snps.ids'", "../private.txt is outside the study folder"],
    ),
    "an absolute table path elsewhere": (
        _outside("table", "/etc/passwd"),
        ["spec key 'table'", "/etc/passwd is outside the study folder"],
    ),
    "genotypes reached through ../": (
        lambda s: (
            shutil.copytree(s.parent / "genotypes", s.parent.parent / "elsewhere"),
            _set(genotypes="genotypes/../../elsewhere/cohort")(s),
        ),
        ["spec key 'genotypes'", "outside the study folder"],
    ),
    "unknown spec key": (_set(fmri_path="x"), ["unknown key 'fmri_path'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_it_and_writes_nothing(case, tmp_path, capsys):
    spec = emt_folder(tmp_path / "src", n=8, spec_extra={"split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    edit, expected = BAD[case]
    edit(spec)
    out = tmp_path / "cohort"
    rc = main(["ingest", str(spec), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 or err.startswith("error: invalid ingest spec"), err
    for e in expected:
        assert e in err, (e, err)
    assert "secret-line" not in err  # a file outside the study folder is never read, let alone echoed
    assert not out.exists()


def test_an_image_replaced_after_ingest_remakes_its_shard(tmp_path):
    """A rerun notices a source that changed since its shard was written (size or mtime) and
    writes that shard again; the others are kept."""
    spec = cnn3d_folder(tmp_path / "src", n=18, spec_extra={"split": {"test": 0.2, "val": 0.2, "folds": 3}})
    out = tmp_path / "cohort"
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    before = _shards(out)
    img = spec.parent / "sub-03" / "anat" / "sub-03_T1w.nii"
    other = ANATOMICAL[0] if img.read_bytes() != Path(ANATOMICAL[0]).read_bytes() else ANATOMICAL[1]
    copy_image(other, img)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # a clock-proof change
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert "remade 1" in r.stdout and "sub-03_T1w.nii changed since the shard was written" in r.stdout, r.stdout
    assert "kept 2" in r.stdout
    after = _shards(out)
    assert not np.array_equal(before["volume"], after["volume"])  # the new image is in the cohort now
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert "kept 3 verified" in r.stdout  # and is not remade again


def test_ingest_onto_a_full_disk_leaves_no_shard_taken_for_a_good_one(tmp_path):
    """A broken shard is remade on a full disk (a small tmpfs; where none can be mounted, a
    per-process file size limit fails the same write): the error names the shard, the
    broken file stays as it was and is still reported bad, no temporary is left."""
    spec = emt_folder(
        tmp_path / "src", n=8, spec_extra={"split": {"train": 0.5, "val": 0.25, "test": 0.25}, "subjects_per_shard": 4}
    )
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    try:
        root = disk / "cohort"
        cli("ingest", str(spec), "--out", str(root), "--quiet")
        p = root / "shard-00001.h5"
        with open(p, "r+b") as f:
            f.truncate(1000)
        limit = None
        if mounted:
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * max(free - 16 * 1024, 0))
        else:
            limit = 16 * 1024

        def preexec():
            if limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        before = snapshot(root)
        r = subprocess.run(
            [sys.executable, "-m", "trd_hpc.cli", "ingest", str(spec), "--out", str(root), "--quiet"],
            cwd=REPO,
            capture_output=True,
            text=True,
            preexec_fn=preexec,
        )
        assert r.returncode != 0 and "shard-00001.h5" in r.stderr and r.stderr.count("\n") == 1, r.stdout + r.stderr
        assert ("no space left on device" if mounted else "file too large") in r.stderr.lower()
        assert snapshot(root) == before
        problems = [str(x) for x in validate_cohort_dir(root, progress=False)]
        assert any("shard-00001.h5" in x for x in problems), problems
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
