"""The trust boundary: files others hand you (bundles, specs, configs, cohorts) and the
places a hostile name could reach (locks, temporary files, file names, spreadsheets).

Each test plants the hostile input, runs what a user runs, and checks both that it was
refused (or defused) and that nothing it asked for happened: a payload that would create a
marker file leaves none, a link planted to a victim leaves the victim as it was."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from tests.conftest import CONFIGS, cli, train_tiny
from trd_hpc.bundle import VERSION, bundle_digest, load_bundle
from trd_hpc.config import ConfigError, load_config
from trd_hpc.errors import WriteError
from trd_hpc.tasks.emt.example import emt_folder


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _relist(bundle: Path) -> None:
    """Rewrite bundle.json's hashes for the files as they are now: what someone forging a
    bundle would do, so a test reaches the defence behind the hash check."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"] = {f: hashlib.sha256((bundle / f).read_bytes()).hexdigest() for f in meta["files"]}
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _error(r, code: int | None = None) -> str:
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 1, r.stderr
    return errs[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, emt_cohort_dir):
    return train_tiny(tmp_path_factory.mktemp("trust") / "run", f"data.cohort={emt_cohort_dir}", "train.num_threads=1")


@pytest.fixture
def bundle(run, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(run / "bundle", b)
    return b


def _predict(bundle: Path, cohort: Path, out: Path, *extra: str):
    return cli("predict", str(bundle), "--cohort", str(cohort), "--out", str(out), "--quiet", *extra, check=False)


# ------------------------------------------------------------------ payloads that must not run
def test_a_pickle_payload_as_model_pt_does_not_run(bundle, emt_cohort_dir, tmp_path):
    marker = tmp_path / "ran"
    (bundle / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    _relist(bundle)
    err = _error(_predict(bundle, emt_cohort_dir, tmp_path / "p.csv"))
    assert "model.pt" in err and "cannot be loaded" in err
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "p.csv").exists()


def test_a_pickle_payload_as_the_calibrators_does_not_run(bundle, emt_cohort_dir, tmp_path):
    marker = tmp_path / "ran"
    (bundle / "calibrators.json").write_bytes(pickle.dumps(_Payload(marker)))
    _relist(bundle)
    err = _error(_predict(bundle, emt_cohort_dir, tmp_path / "p.csv"))
    assert "calibrators.json: not valid JSON" in err
    assert not marker.exists(), "the pickle payload ran"


def test_a_yaml_python_tag_in_a_bundle_config_does_not_run(bundle, emt_cohort_dir, tmp_path):
    marker = tmp_path / "ran"
    (bundle / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    _relist(bundle)
    err = _error(_predict(bundle, emt_cohort_dir, tmp_path / "p.csv"))
    assert "config.yaml" in err
    assert not marker.exists(), "the YAML payload ran"


def test_a_yaml_python_tag_in_an_ingest_spec_or_a_config_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    spec = emt_folder(tmp_path / "src", n=8)
    spec.write_text(f"task: emt\nextra: !!python/object/apply:os.system ['touch {marker}']\n")
    err = _error(cli("ingest", str(spec), "--out", str(tmp_path / "c"), "--quiet", check=False))
    assert "spec.yaml: not valid YAML" in err
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"task: emt\ntrain: !!python/object/apply:os.system ['touch {marker}']\n")
    err = _error(cli("train", str(cfg), "--out", str(tmp_path / "r"), check=False))
    assert "exp.yaml: not valid YAML" in err
    assert not marker.exists(), "a YAML payload ran"


# ------------------------------------------------------------------ a bundle verified on load
def test_a_model_pt_swapped_in_from_another_run_is_refused(bundle, emt_cohort_dir, tmp_path):
    state = torch.load(bundle / "model.pt", weights_only=True)
    other = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}  # another run's weights
    torch.save(other, bundle / "model.pt")
    err = _error(_predict(bundle, emt_cohort_dir, tmp_path / "p.csv"))
    assert "model.pt: sha256" in err and "differs from" in err and "refused" in err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("name", ["metrics.json", "preprocessing.json", "schema.json", "config.yaml"])
def test_any_file_changed_after_writing_is_refused(bundle, name):
    with open(bundle / name, "a") as f:
        f.write("\n")
    with pytest.raises(Exception, match=f"{name}: sha256 .* differs"):
        load_bundle(bundle)


def test_a_calibrators_file_left_off_the_listing_is_refused_not_skipped(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    del meta["files"]["calibrators.json"]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="calibrators.json: present but not listed"):
        load_bundle(bundle)


def test_a_default_calibrator_that_is_not_fitted_is_refused(bundle):
    cal = json.loads((bundle / "calibrators.json").read_text())
    cal["default"] = "temperature_v2"
    (bundle / "calibrators.json").write_text(json.dumps(cal))
    _relist(bundle)
    with pytest.raises(Exception, match="default calibrator 'temperature_v2' is not among the fitted"):
        load_bundle(bundle)


def test_a_symlinked_bundle_file_and_an_old_unhashed_bundle_are_refused(bundle, tmp_path):
    elsewhere = tmp_path / "metrics.json"
    shutil.copyfile(bundle / "metrics.json", elsewhere)
    (bundle / "metrics.json").unlink()
    (bundle / "metrics.json").symlink_to(elsewhere)
    with pytest.raises(Exception, match="metrics.json: a symbolic link"):
        load_bundle(bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta.update(version=1, files=list(meta["files"]))
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match=f"version 1; this trd-hpc reads version {VERSION} .*no file hashes"):
        load_bundle(bundle)


def test_predict_prints_the_bundle_digest_and_records_what_it_predicted(run, emt_cohort_dir, tmp_path):
    out = tmp_path / "p.csv"
    r = _predict(run, emt_cohort_dir, out)
    assert r.returncode == 0, r.stderr
    digest = bundle_digest(run)
    assert f"bundle sha256 {digest}" in r.stdout
    prov = json.loads((tmp_path / "p.csv.provenance.json").read_text())
    assert prov["model"]["bundle_sha256"] == digest and prov["split"] == "test"
    assert (
        prov["cohort"]["manifest_sha256"] == hashlib.sha256((emt_cohort_dir / "manifest.json").read_bytes()).hexdigest()
    )
    assert prov["rows"] == len(out.read_text().splitlines()) - 1


def test_finalize_refuses_parts_of_two_bundles(run, bundle, emt_cohort_dir, tmp_path):
    # bundle: the same model with another metrics.json, i.e. another bundle digest
    m = json.loads((bundle / "metrics.json").read_text())
    m["note"] = "another run"
    (bundle / "metrics.json").write_text(json.dumps(m))
    _relist(bundle)
    out = tmp_path / "p.csv"
    for k, src in ((0, run), (1, bundle)):
        r = _predict(src, emt_cohort_dir, out, "--shard-index", str(k), "--num-shards", "2")
        assert r.returncode == 0, r.stderr
    err = _error(cli("predict", "--finalize", "--out", str(out), check=False))
    assert "p.csv.part-00001-of-00002.csv was predicted by bundle" in err and "not merged" in err
    assert not out.exists() and len(list(tmp_path.glob("p.csv.part-*.csv"))) == 2  # the parts are kept


# ------------------------------------------------------------------ config resolvers
@pytest.mark.parametrize(
    "overrides",
    [
        ["data.cohort=${oc.env:HOME}"],
        ["data.cohort=x\\\\${oc.env:HOME}"],  # an escaped backslash, then a live call
        ["tracking.group=oc", "data.cohort=${${tracking.group}.env:HOME}"],  # the resolver named by a key
        ["data.cohort=${oc.decode:'1'}"],
    ],
)
def test_every_interpolation_that_calls_a_resolver_is_refused(overrides):
    with pytest.raises(ConfigError, match="calls the OmegaConf resolver"):
        load_config(CONFIGS / "emt_tiny.yaml", overrides)


def test_a_plain_interpolation_and_an_escaped_one_are_values():
    cfg = load_config(CONFIGS / "emt_tiny.yaml", ["data.cohort=${cohort.kind}", "tracking.group=\\${oc.env:HOME}"])
    assert cfg.data.cohort == "emt" and cfg.tracking.group == "${oc.env:HOME}"  # a literal, nothing read
    assert os.environ["HOME"] not in str(cfg.tracking.group)


# ------------------------------------------------------------------ locks and temporary files
def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_kept(emt_cohort_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".trd-hpc.lock").symlink_to(victim)
    r = cli("train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(out), f"data.cohort={emt_cohort_dir}", check=False)
    assert "lock file is a symbolic link" in _error(r)
    assert victim.read_text() == "precious\n"


def test_temporary_names_are_unpredictable_and_never_follow_a_planted_link(tmp_path, monkeypatch):
    from trd_hpc import fsio

    target = tmp_path / "out.json"
    a, b = fsio.temp_name(target), fsio.temp_name(target)
    assert a != b and a.name.startswith(f".out.json.tmp-{socket.gethostname()}-{os.getpid()}-r")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = tmp_path / ".out.json.tmp-planted"
    planted.symlink_to(victim)
    monkeypatch.setattr(fsio, "temp_name", lambda path: planted)  # as if the name had been guessed
    with pytest.raises(WriteError, match="cannot write .*out.json"):
        fsio.atomic_write_json(target, {"x": 1})
    assert victim.read_text() == "precious\n" and not target.exists()


# ------------------------------------------------------------------ hostile participant ids
# Ids as a study's table may hold them: one that climbs out of any folder it becomes a file
# name in, and ones a spreadsheet would run as formulas.
HOSTILE = {"iid_0": "a/../../../escaped", "iid_1": "=1+2", "iid_2": "@SUM(A1)", "iid_3": "+cmd"}


def _hostile_folder(root: Path) -> Path:
    """emt_folder's study with four subjects renamed to HOSTILE ids (table, .fam, images); the
    images sit under a template deep enough that every id's image stays inside the folder."""
    spec = emt_folder(root, n=12, spec_extra={"split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    deep = root / "deep" / "er" / "still"
    for img in sorted(root.glob("sub-*/func/*.nii.gz")):
        key = img.parent.parent.name[4:]
        new = HOSTILE.get(key, key)
        dst = Path(os.path.normpath(deep / f"sub-{new}.nii.gz"))
        (deep / "sub-a").mkdir(parents=True, exist_ok=True)  # 'sub-a/../..' climbs from here
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(img, dst)
    table = root / "participants.tsv"
    lines = table.read_text().splitlines()
    for i, line in enumerate(lines[1:], 1):
        pid, rest = line.split("\t", 1)
        key = pid.removeprefix("sub-")
        if key in HOSTILE:
            lines[i] = f"{HOSTILE[key]}\t{rest}"  # as written: the id itself, no sub- before it
    table.write_text("\n".join(lines) + "\n")
    fam = root / "genotypes" / "cohort.fam"
    rows = [r.split("\t") for r in fam.read_text().splitlines()]
    for r in rows:
        r[1] = HOSTILE.get(r[1], r[1])
    fam.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    d = yaml.safe_load(spec.read_text())
    d["fmri"] = "deep/er/still/sub-{id}.nii.gz"
    spec.write_text(yaml.safe_dump(d))
    return spec


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    spec = _hostile_folder(root / "src")
    cohort = root / "cohort"
    r = cli("ingest", str(spec), "--out", str(cohort), "--quiet")
    assert "12 subjects" in r.stdout, r.stdout
    return cohort, train_tiny(root / "run", f"data.cohort={cohort}")


def test_hostile_participant_ids_stay_inside_the_explanations_folder_and_out_of_formulas(hostile_run, tmp_path):
    """``predict --explain`` on a cohort whose ids climb (``a/../../../escaped``) or start a
    formula (``=1+2``): every map lands inside the explanations folder, no cell starts a
    formula, and the ids are still there to read (behind OWASP's apostrophe)."""
    cohort, run = hostile_run
    work = tmp_path / "work" / "deep" / "er"
    work.mkdir(parents=True)
    out = work / "p.csv"
    r = _predict(run, cohort, out, "--split", "all", "--explain")
    assert r.returncode == 0, r.stderr
    folder = work / "p_explanations"
    maps = sorted(p for p in tmp_path.rglob("*.nii.gz"))
    assert len(maps) >= 12 and all(m.parent == folder and not m.name.startswith(".") for m in maps), maps
    assert not [p for p in tmp_path.rglob("*escaped*") if p.parent != folder], "an id made predict write outside"
    rows = out.read_text().splitlines()[1:] + (folder / "explanations.csv").read_text().splitlines()[1:]
    cells = [c.strip('"') for row in rows for c in row.split(",")]
    assert not [c for c in cells if c[:1] in ("=", "+", "@")], "a cell a spreadsheet would run"
    from trd_hpc.predict import read_predictions

    pids = set(read_predictions(out).participant_id)
    assert {"'=1+2", "'@SUM(A1)", "'+cmd", "a/../../../escaped"} <= pids, pids


def test_safe_filename_is_the_one_door_from_data_to_a_file_name():
    from trd_hpc.fsio import safe_filename

    assert safe_filename("sub-01") == "sub-01"  # a plain id unchanged
    for bad in ("../../..", "a/b", ".hidden", "", "x" * 300, "sub 01\n"):
        name = safe_filename(bad)
        assert "/" not in name and not name.startswith(".") and 0 < len(name) <= 120, name
    assert safe_filename("a/b") != safe_filename("a_b")  # two ids never share a file


# ------------------------------------------------------------------ predict and export on the edges
def test_a_stale_temp_of_a_predict_killed_with_sigkill_is_removed(run, emt_cohort_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no one's now: a writer killed with -9 looks like this
    stale = tmp_path / f".p.csv.tmp-{socket.gethostname()}-{dead.pid}-rdeadbeef"
    stale.write_text("half a file")
    unrelated = tmp_path / f".notes.txt.tmp-{socket.gethostname()}-{dead.pid}"
    unrelated.write_text("someone else's")
    assert _predict(run, emt_cohort_dir, tmp_path / "p.csv").returncode == 0
    assert not stale.exists() and unrelated.exists()  # only this output's temps go


def test_parquet_is_written_or_refused_before_any_work(run, emt_cohort_dir, tmp_path):
    out = tmp_path / "p.parquet"
    r = _predict(run, emt_cohort_dir, out)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    from trd_hpc.predict import read_predictions  # noqa: F401  (csv); parquet through pandas

    assert len(pd.read_parquet(out)) > 0 and (tmp_path / "p.parquet.provenance.json").is_file()
    assert not list(tmp_path.glob("p.parquet.part-*"))
    # without pyarrow: refused first, nothing written
    code = (
        "import sys; sys.modules['pyarrow'] = None\n"
        "from trd_hpc.cli import main\n"
        f"sys.exit(main(['predict', {str(run)!r}, '--cohort', {str(emt_cohort_dir)!r}, '--out', "
        f"{str(tmp_path / 'q.parquet')!r}, '--quiet']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Parquet needs pyarrow" in p.stderr and "trd-hpc[predict]" in p.stderr, p.stderr
    assert not list(tmp_path.glob("q.parquet*")) and not list(tmp_path.glob(".q.parquet*"))


def test_an_export_on_a_full_disk_keeps_the_previous_one(run, small_fs):
    out = small_fs / "emt.ts"
    r = cli("export", str(run), "--format", "torchscript", "--out", str(out), check=False)
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    st = os.statvfs(small_fs)
    with open(small_fs / "filler", "wb") as f:  # leave less than the export needs
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - 16 * 1024, 0))
    r = cli("export", str(run), "--format", "torchscript", "--out", str(out), check=False)
    err = _error(r, 1)
    assert "no space left on device" in err and str(out) in err
    assert out.read_bytes() == before, "the previous export was damaged"
    assert not [p for p in small_fs.iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_the_bundle_written_by_a_run_loads_and_lists_every_file_with_its_hash(run):
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["version"] == VERSION and isinstance(meta["files"], dict)
    for f, h in meta["files"].items():
        assert hashlib.sha256((run / "bundle" / f).read_bytes()).hexdigest() == h, f
    assert set(meta["files"]) >= {"model.pt", "config.yaml", "calibrators.json"}
    assert yaml.safe_load((run / "bundle" / "config.yaml").read_text())["data"]["cohort"] == "cohort"
