"""Bad cohort directories, manifests and configs: each fails with one line naming the
file, field or key, and leaves what is on disk exactly as it was.

Rows of the hardening list: 1 nothing foreign is overwritten by generate, 2 nothing
bad is trained on, 3 configs, 4 temporary files, 5 locks, 6 error classes; then the
careless-user cases (full disk, read-only use, unreadable records).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import CONFIGS, REPO, cli, snapshot
from trd_hpc.config import ConfigError
from trd_hpc.data.dataset import CohortDataset, make_loader
from trd_hpc.data.generate import check_target_dir, finalize, generate, plan_shards, predicted_labels
from trd_hpc.data.manifest import load_manifest
from trd_hpc.data.sampler import ShardAwareSampler
from trd_hpc.data.validate import validate_cohort_dir
from trd_hpc.errors import CohortError, WriteError
from trd_hpc.fsio import HOST
from trd_hpc.locks import LOCK_FILE

EMT_TINY = str(CONFIGS / "emt_tiny.yaml")
CNN_TINY = str(CONFIGS / "cnn3d_tiny.yaml")


def one_line_error(r, code: int = 1) -> str:
    """The CLI's error from its stderr: the exit code, no traceback, one `error:` line
    (a config error lists one key per following line); progress lines may precede it."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(at) == 1, r.stderr
    return "\n".join(lines[at[0] :])


def edit_manifest(root: Path, fn) -> None:
    p = root / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def flip_bit(path: Path, row: int, column: str = "fmri", byte: int = 100, bit: int = 3) -> None:
    """Flip one bit inside subject ``row``'s chunk of ``column``."""
    with h5py.File(path, "r") as f:
        d = f[column]
        off = d.id.get_chunk_info_by_coord((row,) + (0,) * (d.ndim - 1)).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(off + byte)
        b = fh.read(1)[0]
        fh.seek(off + byte)
        fh.write(bytes([b ^ (1 << bit)]))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="session")
def emt_seed8_dir(tmp_path_factory, emt_tiny):
    """The tiny EMT cohort with another seed: same shapes, same file sizes, other subjects."""
    out = tmp_path_factory.mktemp("emt_seed8") / "cohort"
    generate(emt_tiny.cohort.model_copy(update={"seed": 8}), out, progress=False)
    return out


@pytest.fixture
def volume_cohort_copy(volume_cohort_dir, tmp_path):
    dst = tmp_path / "vol"
    shutil.copytree(volume_cohort_dir, dst)
    return dst


def _foreign_dir(root: Path) -> Path:
    """What another tool leaves: its own manifest.json and a shard-00001.h5 of its own."""
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"tool": "someone-else", "files": ["shard-00001.h5"]}))
    with h5py.File(root / "shard-00001.h5", "w") as f:
        f.create_dataset("images", data=np.arange(100, dtype=np.float32))
    return root


# ================================================================ 1. generate destroys nothing
def test_generate_refuses_another_tools_manifest_and_shard(tmp_path):
    out = _foreign_dir(tmp_path / "theirs")
    before = snapshot(out)
    err = one_line_error(cli("generate", EMT_TINY, "--out", str(out), "--quiet", check=False))
    assert "manifest.json is not a trd-hpc cohort record" in err
    assert "shard-00001.h5 has no trd-hpc attributes" in err and "--force" in err
    assert snapshot(out) == before  # not even a lock file


def test_cohort_of_another_seed_without_cohort_json_is_refused_by_its_manifest(emt_cohort_copy):
    (emt_cohort_copy / "cohort.json").unlink()
    before = snapshot(emt_cohort_copy)
    err = one_line_error(cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "cohort.seed=99", check=False))
    assert "manifest.json records a cohort made differently: cohort.seed (7 on disk, 99 asked)" in err
    assert "shard-00000.h5 was made with seed 7, not 99" in err
    assert snapshot(emt_cohort_copy) == before


def test_shards_of_another_seed_without_any_record_are_refused(emt_cohort_copy):
    (emt_cohort_copy / "cohort.json").unlink()
    (emt_cohort_copy / "manifest.json").unlink()
    before = snapshot(emt_cohort_copy)
    err = one_line_error(cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "cohort.seed=99", check=False))
    for k in range(4):
        assert f"shard-0000{k}.h5 was made with seed 7, not 99" in err
    assert snapshot(emt_cohort_copy) == before


def test_the_same_cohort_without_its_records_is_completed(emt_cohort_copy, emt_tiny):
    # cohort.json and the manifest lost, the shards still there: they are this cohort's.
    (emt_cohort_copy / "cohort.json").unlink()
    (emt_cohort_copy / "manifest.json").unlink()
    res = generate(emt_tiny.cohort, emt_cohort_copy, progress=False)
    assert sorted(res.kept) == [0, 1, 2, 3] and res.finalized
    assert validate_cohort_dir(emt_cohort_copy, progress=False) == []


def test_unrelated_files_are_refused_and_force_writes_beside_them(tmp_path, emt_tiny):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    before = snapshot(out)
    with pytest.raises(CohortError, match=r"not a trd-hpc cohort's \(notes.txt\).*--force"):
        generate(emt_tiny.cohort, out, progress=False)
    assert snapshot(out) == before
    generate(emt_tiny.cohort, out, progress=False, force=True)
    assert (out / "notes.txt").read_text() == "my thesis"
    assert validate_cohort_dir(out, progress=False) == []


def test_force_replaces_another_cohort(emt_cohort_copy, emt_tiny):
    cfg = emt_tiny.cohort.model_copy(update={"seed": 99})
    with pytest.raises(CohortError, match="cohort.seed"):
        generate(cfg, emt_cohort_copy, progress=False)
    res = generate(cfg, emt_cohort_copy, progress=False, force=True)
    assert sorted(res.remade) == [0, 1, 2, 3] and all("another cohort's" in v for v in res.remade.values())
    assert load_manifest(emt_cohort_copy).config.seed == 99
    assert validate_cohort_dir(emt_cohort_copy, progress=False) == []


def test_a_shard_copied_in_from_another_cohort_is_refused_not_remade(emt_cohort_copy, emt_seed8_dir, emt_tiny):
    shutil.copy(emt_seed8_dir / "shard-00002.h5", emt_cohort_copy / "shard-00002.h5")
    before = snapshot(emt_cohort_copy)
    with pytest.raises(CohortError, match=r"shard-00002.h5 was made with seed 8, not 7"):
        generate(emt_tiny.cohort, emt_cohort_copy, progress=False)
    assert snapshot(emt_cohort_copy) == before


def test_a_truncated_shard_of_this_cohort_is_still_remade(emt_cohort_copy, emt_tiny):
    p = emt_cohort_copy / "shard-00001.h5"
    with open(p, "r+b") as f:
        f.truncate(4000)
    res = generate(emt_tiny.cohort, emt_cohort_copy, progress=False)
    assert list(res.remade) == [1] and sorted(res.kept) == [0, 2, 3]
    assert validate_cohort_dir(emt_cohort_copy, progress=False) == []


def test_check_target_dir_for_train(tmp_path, emt_cohort_dir, emt_tiny):
    """What `train` calls before generating a missing cohort into data.cohort."""
    cfg = emt_tiny.cohort
    check_target_dir(cfg, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_target_dir(cfg, tmp_path / "empty")
    check_target_dir(cfg, emt_cohort_dir)
    with pytest.raises(CohortError, match=r"manifest.json is not a trd-hpc cohort record"):
        check_target_dir(cfg, _foreign_dir(tmp_path / "theirs"))
    check_target_dir(cfg, tmp_path / "theirs", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CohortError, match="is not a directory"):
        check_target_dir(cfg, tmp_path / "file", force=True)


def test_finalize_does_not_replace_the_manifest_of_another_cohort(emt_cohort_copy, emt_seed8_dir, emt_tiny):
    shutil.copy(emt_seed8_dir / "manifest.json", emt_cohort_copy / "manifest.json")
    before = snapshot(emt_cohort_copy)
    plan = plan_shards(64, 4)
    with pytest.raises(
        CohortError, match=r"manifest.json: records a cohort made differently \(cohort.seed \(8 on disk, 7 asked\)\)"
    ):
        finalize(emt_tiny.cohort, emt_cohort_copy, plan)
    assert snapshot(emt_cohort_copy) == before
    (emt_cohort_copy / "manifest.json").write_text("{not json")
    with pytest.raises(CohortError, match=r"manifest.json: not valid JSON"):
        finalize(emt_tiny.cohort, emt_cohort_copy, plan)


# ================================================================ 2. nothing bad is trained on
def _train_subject_in(root: Path, shard: int) -> tuple[int, int]:
    m = load_manifest(root)
    s = m.shards[shard]
    sid = next(i for i in m.splits["train"] if s["first_subject"] <= i <= s["last_subject"])
    return sid, sid - s["first_subject"]


def test_a_flipped_bit_is_caught_before_training_naming_shard_and_subject(emt_cohort_copy, tmp_path):
    sid, row = _train_subject_in(emt_cohort_copy, 2)
    flip_bit(emt_cohort_copy / "shard-00002.h5", row)
    before = snapshot(emt_cohort_copy)
    # In the reading process ...
    ds = CohortDataset(emt_cohort_copy, "train")
    with pytest.raises(
        CohortError, match=rf"shard-00002.h5: subject {sid} \(1 of the \d+ checked\) does not match its checksum"
    ):
        for _b in make_loader(ds, 4, ShardAwareSampler.for_dataset(ds, seed=0), num_workers=0):
            pass
    # ... in DataLoader worker processes and in reading threads ...
    for kind in ("process", "thread"):
        ds = CohortDataset(emt_cohort_copy, "train")
        with pytest.raises(CohortError, match=rf"shard-00002.h5: subject {sid} "):
            for _b in make_loader(ds, 4, ShardAwareSampler.for_dataset(ds, seed=0), num_workers=2, worker_type=kind):
                pass
    # ... by `trd-hpc train`, and by a full `cohort validate`.
    run = tmp_path / "run"
    err = one_line_error(
        cli(
            "train",
            EMT_TINY,
            "--out",
            str(run),
            "--no-eval",
            "--quiet",
            f"data.cohort={emt_cohort_copy}",
            "train.max_epochs=1",
            check=False,
        )
    )
    assert f"shard-00002.h5: subject {sid} " in err
    r = cli("cohort", "validate", str(emt_cohort_copy), "--quiet", check=False)
    assert (
        r.returncode == 1 and "shard-00002.h5: checksum mismatch" in r.stderr and f"subjects changed: {sid}" in r.stderr
    )
    assert snapshot(emt_cohort_copy) == before


def test_a_shard_from_another_cohort_is_not_trained_on(emt_cohort_copy, emt_seed8_dir):
    shutil.copy(emt_seed8_dir / "shard-00002.h5", emt_cohort_copy / "shard-00002.h5")
    before = snapshot(emt_cohort_copy)
    ds = CohortDataset(emt_cohort_copy, "all")  # same size, so the manifest's size check passes
    with pytest.raises(CohortError, match=r"shard-00002.h5: was made with seed 8, not 7"):
        ds.__getitems__(list(range(len(ds))))
    r = cli("cohort", "validate", str(emt_cohort_copy), "--quick", "--quiet", check=False)
    assert r.returncode == 1 and "shard-00002.h5: was made with seed 8, not 7" in r.stderr
    assert snapshot(emt_cohort_copy) == before


def _traversal(m):
    m["shards"][0]["file"] = "../../../etc/passwd"


def _absolute(m):
    m["shards"][0]["file"] = "/etc/passwd"


def _subdir(m):
    m["shards"][0]["file"] = "sub/shard-00000.h5"


def _drop_shard_entry(m):
    del m["shards"][1]


def _out_of_range(m):
    m["splits"]["train"].append(64)


def _negative(m):
    m["splits"]["val"].append(-1)


def _duplicate(m):
    m["splits"]["train"].append(m["splits"]["train"][0])


def _leak(m):
    m["splits"]["train"] += m["splits"]["test"][:2]


def _not_int(m):
    m["splits"]["val"][0] = str(m["splits"]["val"][0])


def _no_val(m):
    del m["splits"]["val"]


def _bad_labels(m):
    m["shards"][0]["labels"] = "2" * 16


def _bad_count(m):
    m["shards"][3]["n_subjects"] = "16"


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            _traversal,
            r"key 'shards\[0\]\.file' is '\.\./\.\./\.\./etc/passwd'; a shard must be a file named shard-NNNNN.h5",
        ),
        (_absolute, r"key 'shards\[0\]\.file' is '/etc/passwd'"),
        (_subdir, r"key 'shards\[0\]\.file' is 'sub/shard-00000.h5'"),
        (_drop_shard_entry, r"key 'shards\[1\]\.first_subject' is 32, expected 16.*is a shard entry missing"),
        (_out_of_range, r"key 'splits.train' names subject 64, outside the cohort's 0..63"),
        (_negative, r"key 'splits.val' names subject -1"),
        (_duplicate, r"key 'splits.train' lists subject \d+ 2 times"),
        (_leak, r"keys 'splits.train' and 'splits.test' share 2 subject\(s\).*leaks"),
        (_not_int, r"key 'splits.val' must be a list of integer subject ids"),
        (_no_val, r"key 'splits.val' is missing"),
        (_bad_labels, r"key 'shards\[0\]\.labels' must be 16 digits 0..1"),
        (_bad_count, r"key 'shards\[3\]\.n_subjects' must be a positive integer, got '16'"),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else None,
)
def test_bad_manifest_is_refused_naming_the_key(emt_cohort_copy, edit, expected):
    edit_manifest(emt_cohort_copy, edit)
    before = snapshot(emt_cohort_copy)
    with pytest.raises(CohortError, match=r"manifest.json: " + expected):
        CohortDataset(emt_cohort_copy, "train")
    r = cli("cohort", "validate", str(emt_cohort_copy), "--quick", "--quiet", check=False)
    assert r.returncode == 1 and "manifest.json" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(emt_cohort_copy) == before


def test_overlapping_folds_are_refused(volume_cohort_copy):
    edit_manifest(volume_cohort_copy, lambda m: m["folds"][1].append(m["folds"][0][0]))
    with pytest.raises(CohortError, match=r"manifest.json: keys 'folds\[0\]' and 'folds\[1\]' share 1 subject"):
        CohortDataset(volume_cohort_copy, "fold:1:train")


@pytest.mark.parametrize(
    "content,expected",
    [
        (b'{"schema_version": 1, "config": {', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
        (b"[1, 2, 3]", "not a cohort manifest (a JSON list, not an object)"),
    ],
)
def test_unreadable_manifest(emt_cohort_copy, content, expected):
    (emt_cohort_copy / "manifest.json").write_bytes(content)
    before = snapshot(emt_cohort_copy)
    with pytest.raises(CohortError, match=re.escape(expected)):
        CohortDataset(emt_cohort_copy, "train")
    err = one_line_error(cli("cohort", "info", str(emt_cohort_copy), check=False))
    assert "manifest.json" in err and expected in err
    # generate will not write a new manifest over it either (it may be someone's)
    err = one_line_error(cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "--quiet", check=False))
    assert "manifest.json is" in err and "--force" in err
    assert snapshot(emt_cohort_copy) == before


# ================================================================ 3. configs
@pytest.mark.parametrize(
    "config,override,key",
    [
        (EMT_TINY, "train.lr=inf", "train.lr"),
        (EMT_TINY, "train.lr=nan", "train.lr"),
        (EMT_TINY, "cohort.fmri.noise_sd=inf", "cohort.fmri.noise_sd"),
        (EMT_TINY, "cohort.clinical.trd_shifts.severity=-inf", "cohort.clinical.trd_shifts.severity"),
        (EMT_TINY, "cohort.regions.right_amygdala.offset_mean=nan", "cohort.regions.right_amygdala.offset_mean"),
        (CNN_TINY, "cohort.noise_sd=nan", "cohort.noise_sd"),
        (CNN_TINY, "train.grad_clip_norm=inf", "train.grad_clip_norm"),
        (CNN_TINY, "cohort.severity_ranges=[[66.7,inf],[33.3,66.7],[0,33.3]]", "cohort.severity_ranges.0.1"),
    ],
)
def test_non_finite_numbers_are_refused(config, override, key):
    err = one_line_error(cli("config", "show", config, override, check=False), code=2)
    assert f"'{key}': Input should be a finite number" in err


def test_non_finite_number_in_a_yaml_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text((CONFIGS / "emt_tiny.yaml").read_text().replace("lr: 0.001", "lr: .inf"))
    err = one_line_error(cli("generate", str(y), "--out", str(tmp_path / "c"), check=False), code=2)
    assert "'train.lr': Input should be a finite number" in err
    assert not (tmp_path / "c").exists()


def test_patch_with_zero_or_not_dividing_the_volume():
    err = one_line_error(cli("config", "show", EMT_TINY, "model.patch=[0,6,4]", check=False), code=2)
    assert "'model.patch.0': Input should be greater than or equal to 1" in err
    err = one_line_error(cli("config", "show", EMT_TINY, "model.patch=[5,6,4]", check=False), code=2)
    assert "model.patch (5, 6, 4) does not divide the spatial shape (12, 12, 8) of cohort.fmri.shape" in err


@pytest.mark.parametrize("config,n,least", [(EMT_TINY, 4, 8), (CNN_TINY, 6, 18)])
def test_a_cohort_too_small_to_split_is_refused_before_anything_is_written(tmp_path, config, n, least):
    out = tmp_path / "c"
    err = one_line_error(cli("generate", config, "--out", str(out), f"cohort.n_subjects={n}", check=False), code=2)
    assert f"cohort.n_subjects={n} is too few to split" in err and f"n_subjects={least}" in err
    assert not out.exists()
    cli("generate", config, "--out", str(out), f"cohort.n_subjects={least}", "--quiet")
    assert validate_cohort_dir(out, progress=False) == []


def test_volume_labels_that_cannot_be_split_are_refused_before_anything_is_written(tmp_path, cnn3d_tiny):
    # A rare class: find the seed whose draw leaves it one subject (the check uses the real labels).
    base = cnn3d_tiny.cohort.model_copy(update={"n_subjects": 40, "class_probs": (0.03, 0.485, 0.485)})
    cfg = next(
        c
        for c in (base.model_copy(update={"seed": s}) for s in range(500))
        if np.bincount(predicted_labels(c), minlength=3)[0] == 1
    )
    out = tmp_path / "c"
    with pytest.raises(ConfigError, match=r"cohort.n_subjects=40 with cohort.split .* cannot be split.*only 1 member"):
        generate(cfg, out, progress=False)
    assert not out.exists()


SECRET = "s3cr3t-7a1f-do-not-log"


def _no_file_holds_secret(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_env_resolver_is_refused_and_the_secret_appears_nowhere(tmp_path):
    env = {"TRD_FAKE_SECRET": SECRET}
    r = cli("config", "show", EMT_TINY, "tracking.project=${oc.env:TRD_FAKE_SECRET}", env=env, check=False)
    err = one_line_error(r, code=2)
    assert "key 'tracking.project' calls the OmegaConf resolver 'oc.env'" in err
    assert SECRET not in r.stdout + r.stderr

    y = tmp_path / "exp.yaml"
    y.write_text((CONFIGS / "emt_tiny.yaml").read_text() + "\ntracking:\n  project: ${oc.env:TRD_FAKE_SECRET}\n")
    run, cohort = tmp_path / "run", tmp_path / "cohort"
    for args in (
        ["train", str(y), "--out", str(run), f"data.cohort={cohort}"],
        ["generate", str(y), "--out", str(cohort)],
        ["generate", EMT_TINY, "--out", str(cohort), "tracking.tags=[ok,'${oc.decode:${oc.env:TRD_FAKE_SECRET}}']"],
    ):
        r = cli(*args, env=env, check=False)
        err = one_line_error(r, code=2)
        assert "calls the OmegaConf resolver" in err and SECRET not in r.stdout + r.stderr
    assert not run.exists() and not cohort.exists()
    _no_file_holds_secret(tmp_path)


def test_plain_interpolation_of_another_key_still_works():
    out = cli("config", "show", EMT_TINY, "tracking.group=${cohort.kind}").stdout
    assert "group: emt" in out


# ================================================================ 4. temporary files
def test_generate_removes_only_dead_writers_temps(emt_cohort_copy, emt_tiny):
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        dead_tmp = emt_cohort_copy / f".shard-00001.h5.tmp-{HOST}-{dead_pid()}"
        dead_man = emt_cohort_copy / f".manifest.json.tmp-{HOST}-{dead_pid()}"
        live_tmp = emt_cohort_copy / f".shard-00002.h5.tmp-{HOST}-{live.pid}"
        other_host = emt_cohort_copy / f".shard-00003.h5.tmp-elsewhere-{dead_pid()}"
        for p in (dead_tmp, dead_man, live_tmp, other_host):
            p.write_bytes(b"partial")
        cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "--quiet")
        assert not dead_tmp.exists() and not dead_man.exists()
        assert live_tmp.read_bytes() == b"partial"  # a live writer's file is its own
        assert other_host.exists()  # its pid means nothing on this host
    finally:
        live.stdin.close()
        live.wait()


def test_records_are_written_atomically(tmp_path, emt_tiny):
    # Every file a reader opens is renamed into place: no temporary is left beside it.
    out = tmp_path / "c"
    generate(emt_tiny.cohort, out, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if ".tmp-" in n]
    assert set(names) == {"cohort.json", "manifest.json", LOCK_FILE} | {f"shard-0000{k}.h5" for k in range(4)} | {
        f".shard-0000{k}.json" for k in range(4)
    }


# ================================================================ 5. locks
HOLD = """
import sys
from trd_hpc.locks import DirLock
held = [DirLock(sys.argv[1], what="cohort directory", shared=sys.argv[2] == "shared").acquire()]
if len(sys.argv) > 3:
    held.append(DirLock(sys.argv[1], what="shard", name=sys.argv[3]).acquire())
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_lock(out: Path, shared: bool = False, shard_lock: str | None = None):
    """A process that holds the cohort's lock until the block ends (no timing involved:
    it says when it holds it, and lets go when its stdin closes)."""
    args = [sys.executable, "-c", HOLD, str(out), "shared" if shared else "exclusive"] + (
        [shard_lock] if shard_lock else []
    )
    p = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.stdin.close()
        p.wait(timeout=60)


def test_a_second_generate_is_refused_naming_the_holder(emt_cohort_copy):
    with held_lock(emt_cohort_copy) as holder:
        before = snapshot(emt_cohort_copy)
        for extra in ([], ["--finalize"], ["--shard-index", "1"]):
            err = one_line_error(
                cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "--quiet", *extra, check=False)
            )
            assert f"is in use by pid {holder.pid} on {HOST}" in err, extra
        assert snapshot(emt_cohort_copy) == before
    cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "--quiet")


def test_array_tasks_share_the_directory_but_not_a_shard(tmp_path):
    out = tmp_path / "c"
    base = ["generate", CNN_TINY, "--out", str(out), "--num-shards", "3", "--quiet", "cohort.n_subjects=30"]
    with held_lock(out, shared=True, shard_lock=".shard-00001.lock") as task1:  # array task 1, still writing
        r = cli(*base, "--shard-index", "0")
        assert (out / "shard-00000.h5").exists() and "not written yet" in r.stdout
        err = one_line_error(cli(*base, "--shard-index", "1", check=False))
        assert f"shard 1 of this cohort is in use by pid {task1.pid}" in err
        err = one_line_error(cli(*base, check=False))
        assert f"in use by array tasks writing shards: pid {task1.pid} on {HOST} (shard-00001)" in err
        err = one_line_error(cli(*base, "--finalize", check=False))
        assert "in use by" in err
    cli(*base, "--shard-index", "2")
    r = cli(*base, "--shard-index", "1")  # the last task writes the manifest
    assert "manifest:" in r.stdout
    assert validate_cohort_dir(out, progress=False) == []


def test_the_lock_of_a_killed_process_is_taken_over(emt_cohort_copy, emt_tiny):
    code = (
        "import os, signal, sys; from trd_hpc.locks import DirLock; "
        "DirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(emt_cohort_copy)], cwd=REPO)
    assert p.wait() == -signal.SIGKILL
    assert json.loads((emt_cohort_copy / LOCK_FILE).read_text())["pid"] == p.pid  # left behind
    res = generate(emt_tiny.cohort, emt_cohort_copy, progress=False)
    assert sorted(res.kept) == [0, 1, 2, 3]


# ================================================================ 6. error classes
def test_argument_errors_are_config_errors(tmp_path, emt_tiny):
    out = tmp_path / "c"
    for extra, msg in (
        (["--num-shards", "0"], "--num-shards must be between 1"),
        (["--num-shards", "65"], "--num-shards must be between 1"),
        (["--shard-index", "4"], "--shard-index 4 is outside 0..3"),
    ):
        err = one_line_error(cli("generate", EMT_TINY, "--out", str(out), *extra, check=False), code=2)
        assert msg in err
    assert not out.exists()
    err = one_line_error(cli("bench", "load", "--config", CNN_TINY, "--subjects", "8", check=False), code=2)
    assert "use an EMT config" in err


def test_a_missing_fold_is_a_cohort_error(volume_cohort_dir):
    with pytest.raises(CohortError, match="fold 7 does not exist"):
        CohortDataset(volume_cohort_dir, "fold:7:train")


# ================================================================ careless users
def test_truncated_cohort_json_is_refused_untouched(emt_cohort_copy):
    p = emt_cohort_copy / "cohort.json"
    p.write_text(p.read_text()[:40])
    before = snapshot(emt_cohort_copy)
    err = one_line_error(cli("generate", EMT_TINY, "--out", str(emt_cohort_copy), "--quiet", check=False))
    assert "cohort.json is not valid JSON" in err
    assert snapshot(emt_cohort_copy) == before


def test_out_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    err = one_line_error(cli("generate", EMT_TINY, "--out", str(f), check=False))
    assert f"{f}: exists and is not a directory" in err
    assert f.read_text() == "x"


def test_reading_a_cohort_writes_nothing_into_it(emt_cohort_copy):
    # What train, evaluate and validate do with a cohort: nothing there may change, so a
    # read-only cohort directory (a shared data set) works.
    before = snapshot(emt_cohort_copy)
    listing = sorted(p.name for p in emt_cohort_copy.rglob("*"))
    for split in ("train", "val", "test", "all"):
        ds = CohortDataset(emt_cohort_copy, split)
        for _b in make_loader(ds, 8, ShardAwareSampler.for_dataset(ds, seed=0), num_workers=0):
            pass
        ds.close()
    assert validate_cohort_dir(emt_cohort_copy, progress=False) == []
    cli("cohort", "info", str(emt_cohort_copy))
    assert snapshot(emt_cohort_copy) == before
    assert sorted(p.name for p in emt_cohort_copy.rglob("*")) == listing


def test_not_enough_space_is_refused_before_writing(tmp_path, emt_tiny):
    # ~900 TB asked: more than any test machine has free.
    big = emt_tiny.cohort.model_copy(
        update={"n_subjects": 1000, "fmri": emt_tiny.cohort.fmri.model_copy(update={"shape": (4800, 4800, 240, 80)})}
    )
    out = tmp_path / "c"
    with pytest.raises(
        WriteError, match=r"c: the shards still to be written need about .* GB free; nothing was written"
    ):
        generate(big, out, progress=False)
    assert not out.exists()


WRITE_FAILS = """
import sys
from trd_hpc.config import load_config
from trd_hpc.data.generate import generate
from trd_hpc.errors import TrdError
try:
    generate(load_config(sys.argv[1]).cohort, sys.argv[2], progress=False)
except TrdError as e:
    print(type(e).__name__, e)
"""


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


def test_a_write_failing_mid_shard_leaves_the_old_file_and_no_partial_one(tmp_path, emt_cohort_dir):
    """A full disk (a small tmpfs) while a broken shard is remade; where no tmpfs can
    be mounted, a per-process file size limit makes the same write fail."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "1600k")
    try:
        root = disk / "cohort"
        shutil.copytree(emt_cohort_dir, root)
        p = root / "shard-00001.h5"
        with open(p, "r+b") as f:  # broken: it will be remade (and counts as present for the space check)
            f.truncate(1000)
        limit = None
        if mounted:
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))  # 64 KiB left
        else:
            limit = 64 * 1024  # per file: the shard fails, the small records fit

        def preexec():
            if limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        before = snapshot(root)
        r = subprocess.run(
            [sys.executable, "-c", WRITE_FAILS, EMT_TINY, str(root)],
            cwd=REPO,
            capture_output=True,
            text=True,
            preexec_fn=preexec,
        )
        assert r.stdout.startswith("WriteError cannot write ") and "shard-00001.h5" in r.stdout, r.stdout + r.stderr
        assert ("no space left on device" if mounted else "file too large") in r.stdout.lower()
        assert "the previous file (if any) is unchanged" in r.stdout and r.stdout.count("\n") == 1
        assert snapshot(root) == before  # the broken shard as it was, no temporary, no manifest change
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
