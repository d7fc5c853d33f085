"""`trd-hpc ingest --check`: every problem of a folder in one pass, and the ingest report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from tests.conftest import cli
from trd_hpc.tasks.emt.example import emt_folder


def _five_faults(root: Path) -> Path:
    """An EMT example folder with five different faults."""
    spec = emt_folder(root, n=24)
    table = root / "participants.tsv"
    df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
    df.loc[0, "trd"] = "maybe"  # 1. a label value not in `labels`
    df.loc[1, "hamd"] = "twelve"  # 2. a clinical value that is not a number
    df.to_csv(table, sep="\t", index=False)
    pid = df.loc[2, "participant_id"].removeprefix("sub-")
    next((root / f"sub-{pid}" / "func").glob("*.nii.gz")).unlink()  # 3. a subject without its image
    pid = df.loc[4, "participant_id"].removeprefix("sub-")
    next((root / f"sub-{pid}" / "func").glob("*.nii.gz")).write_bytes(b"not an image")  # 4. unreadable
    (root / "snps.txt").write_text("sid_1\nsid_2\nrs_not_there\n")  # 5. a variant not in the .bim
    d = yaml.safe_load(spec.read_text())
    d.update({"snps": {"ids": "snps.txt"}, "on_missing": "error"})
    spec.write_text(yaml.safe_dump(d))
    return spec


def test_check_reports_five_different_faults_in_one_run(tmp_path):
    spec = _five_faults(tmp_path / "src")
    r = cli("ingest", str(spec), "--check", "--report", str(tmp_path / "rep"), check=False)
    assert r.returncode != 0
    text = r.stderr
    for expected in (
        "'maybe'",  # the label value
        "'twelve'",  # the clinical value
        "lack a source",  # the missing image
        "not an image nibabel can read",
        "rs_not_there",
    ):
        assert expected in text, (expected, text)
    assert text.count("problem ") >= 5 and "5 problems" in text.strip().splitlines()[-1], text
    rep = json.loads((tmp_path / "rep" / "ingest_report.json").read_text())
    assert rep["status"] == "problems found" and len(rep["problems"]) == 5
    assert rep["availability"]["of"] == 25 and rep["availability"]["genotypes"] == 24  # nogeno1 lacks them
    assert "ingest_report" not in {p.name for p in spec.parent.iterdir()}  # nothing written into the study
    assert (tmp_path / "rep" / "ingest_report.html").read_text().count("<li") == 5


def test_a_good_folder_checks_clean_writes_nothing_and_ingests_with_its_report(tmp_path):
    spec = emt_folder(tmp_path / "src", n=24)
    before = sorted(p.name for p in spec.parent.rglob("*"))
    r = cli("ingest", str(spec), "--check")
    assert "no problem found (nothing written)" in r.stdout
    assert sorted(p.name for p in spec.parent.rglob("*")) == before
    out = tmp_path / "cohort"
    cli("ingest", str(spec), "--out", str(out), "--quiet")
    rep = json.loads((out / "ingest_report.json").read_text())
    assert rep["status"] == "ok" and rep["kept"] == 24 and rep["dropped"][0]["participant_id"] == "nogeno1"
    assert rep["imputed"] == {"age": 1, "hamd": 1}
    g = next(iter(rep["geometry"].values()))
    assert len(g["shape"]) == 4 and len(g["voxel_mm"]) == 3 and len(g["orientation"]) == 3
    r = cli("cohort", "validate", str(out))
    assert "OK" in r.stdout


def test_bench_ingest_times_the_index_against_reading_the_headers(tmp_path):
    js = tmp_path / "bench.json"
    r = cli("bench", "ingest", "--subjects", "16", "--workers", "1", "--index-subjects", "300", "--json", str(js))
    res = json.loads(js.read_text())
    assert res["index_subjects"] == 300 and res["index_s"] > 0 and res["nibabel_headers_alone_s"] > 0
    assert res["ratio_index_vs_headers"] == res["nibabel_headers_alone_s"] / res["index_s"]
    assert "index of 300 subjects" in r.stdout and "target" in r.stdout
