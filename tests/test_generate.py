"""Sharded generation: determinism, repair, crash safety, HDF5 interoperability."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import CONFIGS, REPO, cli, snapshot
from trd_hpc.data.generate import generate
from trd_hpc.data.manifest import load_manifest
from trd_hpc.data.shards import schema
from trd_hpc.data.validate import validate_cohort_dir


def read_all(root: Path) -> dict[str, np.ndarray]:
    """Every column of a cohort, concatenated in subject order."""
    m = load_manifest(root)
    cols: dict[str, list] = {}
    for s in m.shards:
        with h5py.File(root / s["file"], "r") as f:
            for c in schema(m.config):
                cols.setdefault(c.name, []).append(f[c.name][...])
    return {k: np.concatenate(v) for k, v in cols.items()}


def test_same_cohort_from_1_shard_1_process_and_16_shards_4_processes(tmp_path, emt_tiny):
    cfg = emt_tiny.cohort
    a, b = tmp_path / "a", tmp_path / "b"
    generate(cfg, a, num_shards=1, workers=1, progress=False)
    generate(cfg, b, num_shards=16, workers=4, progress=False)
    da, db = read_all(a), read_all(b)
    assert set(da) == set(db)
    for k in da:
        assert da[k].dtype == db[k].dtype
        assert np.array_equal(da[k], db[k]), k
    assert np.array_equal(da["subject_id"], np.arange(cfg.n_subjects))
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma.splits == mb.splits
    assert ma.raw["class_counts"] == mb.raw["class_counts"]


def test_volume_cohort_is_deterministic_across_shard_counts(tmp_path, cnn3d_tiny):
    cfg = cnn3d_tiny.cohort.model_copy(update={"n_subjects": 24})
    a, b = tmp_path / "a", tmp_path / "b"
    generate(cfg, a, num_shards=1, progress=False)
    generate(cfg, b, num_shards=5, progress=False)
    da, db = read_all(a), read_all(b)
    for k in da:
        assert np.array_equal(da[k], db[k]), k
    assert load_manifest(a).folds == load_manifest(b).folds


def test_different_seed_gives_a_different_cohort(tmp_path, emt_tiny):
    a = tmp_path / "a"
    b = tmp_path / "b"
    generate(emt_tiny.cohort.model_copy(update={"n_subjects": 8}), a, progress=False)
    generate(emt_tiny.cohort.model_copy(update={"n_subjects": 8, "seed": 8}), b, progress=False)
    assert not np.array_equal(read_all(a)["fmri"], read_all(b)["fmri"])


def test_shards_carry_schema_and_config_attributes(emt_cohort_dir):
    m = load_manifest(emt_cohort_dir)
    with h5py.File(emt_cohort_dir / m.shards[1]["file"], "r") as f:
        assert int(f.attrs["schema_version"]) == 1
        assert int(f.attrs["seed"]) == m.config.seed
        assert json.loads(f.attrs["generator_config"])["n_subjects"] == m.config.n_subjects
        assert f["fmri"].chunks == (1, *m.config.fmri.shape)
        assert f["fmri"].dtype == np.float16 and f["snp"].dtype == np.uint8 and f["clinical"].dtype == np.float32
        assert f["fmri"].compression is None


def test_manifest_records_shards_splits_and_counts(emt_cohort_dir):
    raw = json.loads((emt_cohort_dir / "manifest.json").read_text())
    assert raw["schema_version"] == 1
    n = raw["config"]["n_subjects"]
    assert sum(s["n_subjects"] for s in raw["shards"]) == n
    first = 0
    for s in raw["shards"]:
        assert s["first_subject"] == first and s["last_subject"] == first + s["n_subjects"] - 1
        assert s["checksum"].startswith("sha256:") and (emt_cohort_dir / s["file"]).stat().st_size == s["bytes"]
        first += s["n_subjects"]
    assert raw["class_counts"] == {"non_trd": n // 2, "trd": n // 2}
    assert set(raw["splits"]) == {"train", "val", "test"}


def test_rerun_keeps_verified_shards(emt_cohort_copy, emt_tiny):
    before = snapshot(emt_cohort_copy)
    res = generate(emt_tiny.cohort, emt_cohort_copy, progress=False)
    assert res.made == [] and res.remade == {} and len(res.kept) == 4
    assert snapshot(emt_cohort_copy) == before


def test_repair_after_deleted_and_corrupted_shards(emt_cohort_copy, emt_tiny):
    good = read_all(emt_cohort_copy)
    (emt_cohort_copy / "shard-00001.h5").unlink()
    p = emt_cohort_copy / "shard-00002.h5"
    with h5py.File(p, "r") as f:
        off = f["fmri"].id.get_chunk_info_by_coord((3, 0, 0, 0, 0)).byte_offset
    with open(p, "r+b") as f:  # flip bytes inside subject 3's fMRI
        f.seek(off + 100)
        f.write(b"\xff\x7f" * 8)
    problems = validate_cohort_dir(emt_cohort_copy, progress=False)
    named = {Path(x.file).name for x in problems}
    assert {"shard-00001.h5", "shard-00002.h5"} <= named
    assert any("checksum" in x.message for x in problems if x.file.endswith("shard-00002.h5"))

    res = generate(emt_tiny.cohort, emt_cohort_copy, progress=False)
    assert 1 in res.made or 1 in res.remade
    assert 2 in res.remade and "checksum" in res.remade[2]
    assert sorted(res.kept) == [0, 3]
    assert validate_cohort_dir(emt_cohort_copy, progress=False) == []
    fixed = read_all(emt_cohort_copy)
    for k in good:
        assert np.array_equal(good[k], fixed[k])


def test_killed_generation_leaves_no_finished_looking_shard_and_rerun_repairs(tmp_path):
    out = tmp_path / "c"
    # Big enough per subject that the kill lands mid-shard.
    args = [
        "generate",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(out),
        "--quiet",
        "cohort.fmri.shape=[48,48,24,40]",
        "cohort.n_subjects=16",
        "cohort.subjects_per_shard=8",
        "cohort.regions.right_amygdala.box=[[30,36],[22,28],[6,10]]",
        "cohort.regions.dorsolateral_prefrontal.box=[[8,16],[36,44],[14,20]]",
        "cohort.regions.anterior_cingulate.box=[[21,27],[32,38],[10,16]]",
    ]
    # The writer kills itself while writing subject 4 of shard 1 (after shard 0 was renamed).
    proc = subprocess.run(
        [sys.executable, "-m", "trd_hpc.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TRD_FAULT": "shard-subject:1:4"},
    )
    assert proc.returncode == -signal.SIGKILL and "dying at shard-subject:1:4" in proc.stderr, proc.stderr
    assert list(out.glob(".shard-00001.h5.tmp-*")), "the writer should have been killed mid-shard"
    assert (out / "shard-00000.h5").exists()
    assert not (out / "manifest.json").exists()
    # Whatever got renamed has a completion record; a partial file never has the final name.
    for f in out.glob("shard-*.h5"):
        assert (out / f".{f.stem}.json").exists()
    r = cli(*args)
    assert "manifest" in r.stdout
    assert not list(out.glob(".shard-*.h5.tmp-*"))
    assert validate_cohort_dir(out, progress=False) == []


def test_shard_index_then_finalize_like_a_slurm_array(tmp_path):
    out = tmp_path / "c"
    base = [
        "generate",
        str(CONFIGS / "cnn3d_tiny.yaml"),
        "--out",
        str(out),
        "--num-shards",
        "3",
        "--quiet",
        "cohort.n_subjects=30",
    ]
    for k in (2, 0):
        r = cli(*base, "--shard-index", str(k))
        assert "not written yet" in r.stdout
    assert not (out / "manifest.json").exists()
    r = cli(*base, "--finalize", check=False)
    assert r.returncode == 1 and "shard-00001.h5" in r.stderr
    r = cli(*base, "--shard-index", "1")
    assert (out / "manifest.json").exists()
    assert cli("cohort", "validate", str(out)).returncode == 0


def test_existing_cohort_with_other_config_is_refused_untouched(emt_cohort_copy):
    before = snapshot(emt_cohort_copy)
    r = cli("generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(emt_cohort_copy), "cohort.seed=99", check=False)
    assert r.returncode == 1
    assert "cohort.seed" in r.stderr and "another --out" in r.stderr
    assert snapshot(emt_cohort_copy) == before


def test_info_summarises(emt_cohort_dir):
    out = cli("cohort", "info", str(emt_cohort_dir)).stdout
    assert "64 in 4 shards" in out and "fmri" in out and "train" in out


def _ensure_hdf5_tools() -> bool:
    if shutil.which("h5dump") and shutil.which("h5ls"):
        return True
    if os.geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "hdf5-tools"],
        env=env,
        capture_output=True,
        timeout=600,
    )
    return bool(shutil.which("h5dump") and shutil.which("h5ls"))


def test_other_hdf5_tools_read_the_shards(emt_cohort_dir):
    if not _ensure_hdf5_tools():
        pytest.skip("h5dump/h5ls missing and `apt-get install hdf5-tools` failed or needs root")
    f = emt_cohort_dir / "shard-00000.h5"
    ls = subprocess.run(["h5ls", "-r", str(f)], capture_output=True, text=True, check=True).stdout
    for name in ("fmri", "snp", "clinical", "label", "subject_id"):
        assert f"/{name}" in ls
    assert "{16, 12, 12, 8, 10}" in ls.replace("/Inf", "")
    dump = subprocess.run(["h5dump", "-d", "/subject_id", str(f)], capture_output=True, text=True, check=True).stdout
    assert "0, 1, 2, 3" in dump
    attrs = subprocess.run(
        ["h5dump", "-A", "-a", "/schema_version", str(f)], capture_output=True, text=True, check=True
    ).stdout
    assert "1" in attrs


def test_labels_known_before_generation_are_the_generated_ones(emt_cohort_dir, volume_cohort_dir):
    # check_splittable tries the splits on these before any shard is written.
    from trd_hpc.data.generate import predicted_labels

    for root in (emt_cohort_dir, volume_cohort_dir):
        m = load_manifest(root)
        assert np.array_equal(predicted_labels(m.config), m.labels())


def test_sidecars_and_manifest_carry_per_subject_checksums(emt_cohort_dir):
    m = load_manifest(emt_cohort_dir)
    for k, s in enumerate(m.shards):
        side = json.loads((emt_cohort_dir / f".shard-{k:05d}.json").read_text())
        assert side["row_crc32"] == s["row_crc32"] and len(s["row_crc32"]) == s["n_subjects"]


def test_bench_scale_writes_trains_on_and_deletes_a_bigger_cohort(tmp_path):
    """`trd-hpc bench scale` end to end at a small size: the big cohort is written with 2 workers,
    both cohorts are trained on in fresh processes for the same steps, figures land in the JSON,
    and the cohorts are gone afterwards."""
    js, scratch = tmp_path / "scale.json", tmp_path / "scratch"
    r = cli(
        "bench", "scale", "--config", str(CONFIGS / "cnn3d_tiny.yaml"), "--subjects", "480", "--steps", "4",
        "--dir", str(scratch), "--json", str(js),
    )  # fmt: skip
    f = json.loads(js.read_text())
    assert (f["subjects"], f["paper_subjects"], f["workers"]) == (480, 240, 2)
    assert f["train_big"]["steps"] == f["train_paper"]["steps"] == 4
    assert f["train_big"]["train_subjects"] > f["train_paper"]["train_subjects"] > 0
    assert f["samples_per_s_ratio"] == pytest.approx(
        f["train_big"]["samples_per_s"] / f["train_paper"]["samples_per_s"]
    )
    assert f["peak_rss_ratio"] > 0 and f["generate_ratio_to_one_worker"] > 0 and f["cohort_gb"] > 0
    assert "x one worker" in r.stdout and "peak RSS" in r.stdout
    assert scratch.is_dir() and not list(scratch.iterdir())  # --dir without --keep: the cohorts are deleted
