"""Bad run directories, checkpoints, concurrent writers, full and read-only disks.

Each case: a one-line error naming the file or key (no traceback), and nothing
that was there before is lost.  Real files, real processes, real file systems
(a small tmpfs for the full and read-only disk cases).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, cli, snapshot
from trd_hpc.locks import DirLock

TINY = str(CONFIGS / "emt_tiny.yaml")
ONE_EPOCH = ["train.max_epochs=1", "train.num_threads=1", "train.checkpoint_every_steps=2"]


def train(out: Path, cohort: Path, *extra: str, check: bool = False, env: dict | None = None):
    return cli(
        "train",
        TINY,
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        f"data.cohort={cohort}",
        *ONE_EPOCH,
        *extra,
        check=check,
        env=env,
    )


def one_line_error(r, *needles: str) -> None:
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = [ln for ln in err if ln.startswith("error: ")]
    assert len(line) == 1, r.stderr
    for n in needles:
        assert n in line[0], (n, line[0])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, emt_cohort_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    r = train(out, emt_cohort_dir, check=True)
    assert r.returncode == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _truncate(p: Path, keep: int | None = None) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 if keep is None else keep])


# ---------------------------------------------------------------------------- damaged run files
def test_garbage_given_to_resume(tmp_path, emt_cohort_dir):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    r = train(tmp_path / "run", emt_cohort_dir, "--resume", str(junk))
    one_line_error(r, str(junk), "not a readable trd-hpc checkpoint")


def test_resume_from_a_missing_checkpoint(tmp_path, emt_cohort_dir):
    r = train(tmp_path / "run", emt_cohort_dir, "--resume", str(tmp_path / "nope.pt"))
    one_line_error(r, "nope.pt", "no such checkpoint")


def test_truncated_model_pt(run_copy):
    _truncate(run_copy / "model.pt")
    before = snapshot(run_copy)
    r = cli("evaluate", str(run_copy), "--no-figures", "eval.baselines=[]", check=False)
    one_line_error(r, str(run_copy / "model.pt"), "truncated")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("how", ["evaluate", "resume"])
def test_truncated_config_yaml(run_copy, emt_cohort_dir, how):
    _truncate(run_copy / "config.yaml", keep=37)
    before = snapshot(run_copy)
    if how == "evaluate":
        r = cli("evaluate", str(run_copy), check=False)
    else:
        r = train(run_copy, emt_cohort_dir, "--resume", "auto")
    one_line_error(r, str(run_copy / "config.yaml"))
    assert snapshot(run_copy) == before


def test_truncated_predictions(run_copy):
    _truncate(run_copy / "predictions" / "test.npz")
    before = snapshot(run_copy)
    r = cli("evaluate", str(run_copy), check=False)
    one_line_error(r, str(run_copy / "predictions" / "test.npz"), "truncated")
    assert snapshot(run_copy) == before


def test_truncated_metrics_json_for_report(run_copy):
    _truncate(run_copy / "metrics.json")
    r = cli("report", str(run_copy), check=False)
    one_line_error(r, str(run_copy / "metrics.json"))


def test_evaluate_of_a_directory_that_is_not_a_run(tmp_path):
    r = cli("evaluate", str(tmp_path), check=False)
    one_line_error(r, "no config.yaml")


# ---------------------------------------------------------------------------- another run's checkpoint
def test_checkpoint_of_another_run_is_refused_naming_the_keys(finished, tmp_path, emt_cohort_dir):
    theirs = sorted((finished / "checkpoints").glob("step-*.pt"))[-1]
    out = tmp_path / "mine"
    r = train(out, emt_cohort_dir, "train.lr=0.005", "--resume", str(theirs))
    one_line_error(r, str(theirs), "checkpoint of another run", "train.lr")
    assert not (out / "model.pt").exists()


def test_checkpoint_trained_on_another_cohort_is_refused(finished, tmp_path, emt_cohort_dir):
    # The same cohort config, but the splits were changed (a train and a val subject swapped).
    cohort = tmp_path / "cohort"
    shutil.copytree(emt_cohort_dir, cohort)
    man = json.loads((cohort / "manifest.json").read_text())
    s = man["splits"]
    s["train"][0], s["val"][0] = s["val"][0], s["train"][0]
    s["train"].sort(), s["val"].sort()
    from trd_hpc.data.manifest import splits_fingerprint

    # as if made with these splits (an edited manifest is refused by its fingerprint before this)
    man["splits_sha256"] = splits_fingerprint(s, man.get("folds", []))
    (cohort / "manifest.json").write_text(json.dumps(man))
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    r = train(run, cohort, "--resume", "auto")
    one_line_error(r, "another cohort")


# ---------------------------------------------------------------------------- failed starts, temps, locks
def test_corrected_config_after_a_failed_start_is_accepted(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    bad = train(out, emt_cohort_dir, "train.lr=1e30", "train.checkpoint_every_steps=0")
    assert bad.returncode == 1 and "NaN/inf" in bad.stderr  # failed at step 1, before any checkpoint
    ok = train(out, emt_cohort_dir)
    assert ok.returncode == 0, ok.stderr
    assert "starting afresh" in ok.stdout and (out / "model.pt").exists()


def test_stale_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, emt_cohort_dir):
    from trd_hpc.fsio import HOST

    out = tmp_path / "run"
    ck = out / "checkpoints"
    ck.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that existed and is gone
    stale = ck / f".step-000000004.pt.tmp-{HOST}-{dead.pid}"
    live = ck / f".step-000000002.pt.tmp-{HOST}-{os.getpid()}"
    other_host = ck / f".step-000000002.pt.tmp-elsewhere-{dead.pid}"
    for p in (stale, live, other_host):
        p.write_bytes(b"half a checkpoint")
    assert train(out, emt_cohort_dir).returncode == 0
    assert not stale.exists() and live.exists() and other_host.exists()
    assert not [p for p in out.rglob(".*.tmp-*") if p not in (live, other_host)]


def test_second_train_into_the_same_out_is_refused_naming_the_holder(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    with DirLock(out, "run directory"):  # held as another `trd-hpc train` would hold it
        r = train(out, emt_cohort_dir)
    one_line_error(r, str(out), f"pid {os.getpid()}", "in use")
    assert not (out / "config.yaml").exists()
    assert train(out, emt_cohort_dir).returncode == 0  # free again


def test_lock_of_a_killed_process_is_taken_over(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from trd_hpc.locks import DirLock; DirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    busy = train(out, emt_cohort_dir)
    one_line_error(busy, f"pid {holder.pid}")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / ".trd-hpc.lock").exists()  # the file stays; the kernel dropped the lock
    assert train(out, emt_cohort_dir).returncode == 0


# ---------------------------------------------------------------------------- full and read-only disks
def test_full_disk_is_one_line_naming_the_file_and_leaves_no_temp(small_fs, emt_cohort_dir):
    out = small_fs / "run"
    # Leave ~60 KiB: enough for config.yaml and the lock, not for a checkpoint.
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (4 * 1024 * 1024 - 60 * 1024))
    r = train(out, emt_cohort_dir)
    one_line_error(r, "no space left on device", str(out))
    assert not list(small_fs.rglob(".*.tmp-*")), "a temp file was left behind"
    filler.unlink()
    r = train(out, emt_cohort_dir, "--resume", "auto")  # room again: the same command continues
    assert r.returncode == 0, r.stderr


def test_read_only_run_directory(small_fs, finished):
    run = small_fs / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    r = cli("evaluate", str(run), "eval.baselines=[]", check=False)
    one_line_error(r, str(run), "read-only")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- the error policy
def test_own_errors_are_one_line_and_others_keep_their_traceback(monkeypatch, capsys):
    from trd_hpc import cli as trd_cli
    from trd_hpc.errors import CohortError

    def boom(exc):
        def f(_):
            raise exc

        return f

    parser = trd_cli.build_parser()
    monkeypatch.setattr(trd_cli, "build_parser", lambda: parser)
    show = parser._subparsers._group_actions[0].choices["config"]._subparsers._group_actions[0].choices["show"]
    show.set_defaults(func=boom(CohortError("cohort /x: shard-00001.h5 is foreign")))
    assert trd_cli.main(["config", "show", TINY]) == 1
    assert capsys.readouterr().err.strip() == "error: cohort /x: shard-00001.h5 is foreign"
    # A CUDA/NCCL/DeepSpeed failure or a bug is not the user's input: its traceback stays.
    show.set_defaults(func=boom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        trd_cli.main(["config", "show", TINY])
