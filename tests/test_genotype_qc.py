"""Genotype QC (snps: mind, geno, hwe, maf) on bed-reader's example fileset: the subjects and
variants removed are the ones PLINK 1.9 (Debian's plink1.9) removes given the same subjects,
the variant filters see the training split only, and the QC table is in the manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import cli
from trd_hpc.data.manifest import load_manifest
from trd_hpc.tasks.emt.example import emt_folder

QC = {"first": 100, "mind": 0.3, "geno": 0.25, "hwe": 0.4, "maf": 0.01}  # hwe high: the example has few common variants


def _plink() -> str | None:
    """plink1.9, installed from Debian's packages when missing (root only)."""
    found = shutil.which("plink1.9")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "plink1.9"],
    ):
        subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    return shutil.which("plink1.9")


@pytest.fixture(scope="module")
def qc_cohort(tmp_path_factory):
    src = tmp_path_factory.mktemp("qc_src")
    spec = emt_folder(src, n=80, spec_extra={"snps": QC})
    out = src.parent / (src.name + "_cohort")
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    return spec, out


def _ids(out: Path) -> list[str]:
    got = []
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            got += [v.decode().removeprefix("sub-") for v in f["participant_id"][...]]
    return got


def _run_plink(plink: str, bfile: Path, keep: list[str], flags: list[str], out: Path) -> None:
    keep_file = out.with_suffix(".keep")
    keep_file.write_text("".join(f"0 {iid}\n" for iid in keep))
    r = subprocess.run(
        [plink, "--bfile", str(bfile), "--keep", str(keep_file), *flags, "--allow-no-sex", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_qc_removes_what_plink_removes_from_the_same_subjects(qc_cohort, tmp_path):
    spec, out = qc_cohort
    m = load_manifest(out)
    src = m.raw["source"]
    qc = src["snp_qc"]
    dropped = {d["participant_id"].removeprefix("sub-") for d in src["dropped"] if "snps.mind" in d["reason"]}
    kept_ids = _ids(out)
    train = [kept_ids[i] for i in m.subjects("train")]
    assert qc["fitted_on"] == "train" and qc["subjects"] == len(train) < len(kept_ids)
    assert dropped and qc["kept"] == len(src["snp_ids"]) < qc["candidates"] == 100
    assert all(qc["removed"][f]["variants"] > 0 for f in ("geno", "hwe", "maf")), qc["removed"]

    plink = _plink()
    bfile = spec.parent / "genotypes" / "cohort"
    if plink is None:  # not root, no apt: the same filters computed here instead of by PLINK
        assert os.environ.get("CI") != "true", "CI runs as root: plink1.9 must install"
        from bed_reader import open_bed

        bed = open_bed(f"{bfile}.bed")
        iid = [str(v) for v in bed.iid]
        x = bed.read(index=np.s_[[iid.index(k) for k in train], :], dtype="float64")
        miss = np.isnan(x).mean(axis=0)
        a1 = np.nanmean(x, axis=0) / 2
        ok = (miss <= QC["geno"]) & (np.minimum(a1, 1 - a1) >= QC["maf"])
        assert set(src["snp_ids"]) <= {s for s, k in zip(bed.sid, ok) if k}
        return
    # mind: over every subject with all sources, as PLINK's --mind
    before = sorted(set(kept_ids) | dropped)
    _run_plink(plink, bfile, before, ["--mind", str(QC["mind"]), "--make-just-fam"], tmp_path / "mind")
    irem = tmp_path / "mind.irem"
    removed = {line.split()[1] for line in irem.read_text().splitlines()} if irem.exists() else set()
    assert removed == dropped
    # geno, hwe, maf: PLINK on the training subjects alone keeps the same variants
    flags = ["--geno", str(QC["geno"]), "--hwe", str(QC["hwe"]), "--maf", str(QC["maf"]), "--write-snplist"]
    _run_plink(plink, bfile, train, flags, tmp_path / "var")
    assert (tmp_path / "var.snplist").read_text().split() == src["snp_ids"]


def test_variant_filters_need_a_training_split(tmp_path):
    spec = emt_folder(tmp_path / "src", n=30, spec_extra={"snps": QC, "label_column": None, "labels": None})
    r = cli("ingest", str(spec), "--out", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "unlabelled cohort has none" in r.stderr.strip().splitlines()[-1], r.stderr


def test_the_trained_model_reads_the_qc_kept_variants(qc_cohort, tmp_path):
    _, out = qc_cohort
    run = tmp_path / "run"
    cli(
        "train", "emt_tiny", "--out", str(run), "--quiet", f"data.cohort={out}", "train.max_epochs=1",
        "eval.baselines=[]", "tracking.wandb=false",
    )  # fmt: skip
    kept = load_manifest(out).raw["source"]["snp_ids"]
    schema = json.loads((run / "bundle" / "schema.json").read_text())
    assert schema["snp_ids"] == kept
