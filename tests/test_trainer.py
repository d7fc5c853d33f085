"""The shared trainer on the tiny EMT config: DDP, exact resume, signals, DeepSpeed,
early stopping, clear errors.  Real processes, real gloo, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS, REPO

TINY = str(CONFIGS / "emt_tiny.yaml")
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(out: Path, cohort: Path, *overrides: str, nproc: int = 1, resume: bool = False) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        base += []
    cmd = base + ["-m", "trd_hpc.cli", "train", TINY, "--out", str(out), "--quiet", "--no-eval",
                  f"data.cohort={cohort}", "train.num_threads=1", *overrides]
    if resume:
        cmd.append("--resume")
    return cmd


def run(cmd: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV})
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def history(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k].float() - b[k].float()).abs().max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, emt_cohort_dir):
    """An uninterrupted 3-epoch run with step checkpoints (the resume tests compare against it)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2"))
    return out


def test_run_directory_layout_and_metrics(reference):
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "model.pt", "predictions/val.npz", "predictions/test.npz"):
        assert (reference / name).exists(), name
    m = metrics(reference)
    for k in ("test.auc", "test.ap", "test.accuracy", "val.auc", "best_epoch", "epochs_run"):
        assert k in m, k
    h = history(reference)
    assert [r["epoch"] for r in h] == [1, 2, 3]
    assert all("val.auc" in r and "train.loss" in r and "lr" in r for r in h)
    # Test predictions cover the whole test split, each subject once.
    with np.load(reference / "predictions" / "test.npz") as z:
        assert len(z["subject_id"]) == len(set(z["subject_id"].tolist())) == 10


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path, emt_cohort_dir, reference):
    out = tmp_path / "run"
    cmd = train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2")
    # 6 steps per epoch: kill as soon as the step-8 checkpoint (mid epoch 2) exists.
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / "step-000000008.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not target.exists() and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert target.exists(), p.stderr.read().decode()[-3000:]
    assert not (out / "model.pt").exists(), "the run finished before it could be killed"
    r = run(train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2", resume=True))
    assert "resumed from" in r.stdout
    assert_same_weights(weights(out), weights(reference))
    assert [row["val.auc"] for row in history(out)] == [row["val.auc"] for row in history(reference)]


def test_sigusr2_writes_checkpoint_exits_cleanly_and_resumes(tmp_path, emt_cohort_dir, reference):
    out = tmp_path / "run"
    cmd = train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2")
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "step-000000002.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not first.exists() and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGUSR2)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGUSR2" and Path(marker["checkpoint"]).exists()
    assert marker["step"] >= 2 and "continue with --resume auto" in stdout
    assert not (out / "model.pt").exists()
    r = run(train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2", resume=True))
    assert f"step {marker['step']}" in r.stdout
    assert not (out / "PREEMPTED").exists()
    assert_same_weights(weights(out), weights(reference))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, emt_cohort_dir):
    # Without dropout the only difference is the order of float additions:
    # 2 ranks x batch 4 see the same samples per step as 1 process x batch 8.
    common = ["train.max_epochs=2", "model.dropout=0.0", "model.encoder_dropout=0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(train_cmd(one, emt_cohort_dir, *common, "train.batch_size=8"))
    run(train_cmd(two, emt_cohort_dir, *common, "train.batch_size=4", "train.strategy=ddp", nproc=2))
    m1, m2 = metrics(one), metrics(two)
    assert m2["world_size"] == 2 and m2["strategy"] == "ddp"
    for k in ("test.auc", "test.accuracy", "test.ap", "val.auc"):
        assert abs(m1[k] - m2[k]) <= 1e-6, (k, m1[k], m2[k])
    assert abs(m1["test.loss"] - m2["test.loss"]) < 1e-4
    assert_same_weights(weights(one), weights(two), exact=False, atol=1e-4)


def test_ddp_resumes_at_another_world_size(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    run(train_cmd(out, emt_cohort_dir, "train.max_epochs=1", "train.batch_size=4", "train.strategy=ddp", nproc=2))
    r = run(train_cmd(out, emt_cohort_dir, "train.max_epochs=2", "train.batch_size=4", "train.strategy=ddp", resume=True))
    assert "resumed from" in r.stdout
    assert [row["epoch"] for row in history(out)] == [1, 2]
    assert metrics(out)["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_runs_on_two_processes_and_resumes(tmp_path, emt_cohort_dir, stage):
    pytest.importorskip("deepspeed")
    ds = [f"train.strategy=deepspeed", f"train.deepspeed_config=zero{stage}_bf16.json", "train.precision=fp32",
          "train.batch_size=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(train_cmd(full, emt_cohort_dir, *ds, "train.max_epochs=2", nproc=2))
    run(train_cmd(part, emt_cohort_dir, *ds, "train.max_epochs=1", nproc=2))
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts and (part / "checkpoints" / ckpts[-1] / "complete").exists()
    r = run(train_cmd(part, emt_cohort_dir, *ds, "train.max_epochs=2", nproc=2, resume=True))
    assert "resumed from" in r.stdout
    assert metrics(part)["strategy"] == "deepspeed" and metrics(part)["world_size"] == 2
    assert_same_weights(weights(part), weights(full), exact=False, atol=1e-6)
    # ZeRO partitions cannot be loaded by another number of processes: a clear error.
    bad = run(train_cmd(part, emt_cohort_dir, *ds, "train.max_epochs=3", nproc=1, resume=True), check=False)
    assert bad.returncode != 0
    assert "ZeRO" in bad.stderr and "world size" in bad.stderr


def test_early_stopping_restores_the_best_epoch(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    # A high learning rate makes the validation AUC wander so the best epoch is not the last.
    run(train_cmd(out, emt_cohort_dir, "train.max_epochs=12", "train.lr=0.02",
                  "train.early_stopping.patience=3", "train.plateau.patience=100"))
    h = history(out)
    m = metrics(out)
    aucs = [r["val.auc"] for r in h]
    best = int(np.argmax(aucs)) + 1  # first epoch reaching the maximum
    assert m["best_epoch"] == best
    assert abs(m["val.auc"] - aucs[best - 1]) < 1e-9  # the final model is the best epoch's
    if m["stopped_early"]:
        assert len(h) == best + 3


def test_nan_loss_is_a_clear_error_naming_the_step(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    r = run(train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.lr=1e30", "train.checkpoint_every_steps=1"), check=False)
    assert r.returncode == 1
    assert "NaN/inf at step" in r.stderr and "Last good checkpoint" in r.stderr
    assert list((out / "checkpoints").glob("step-*.pt"))


def test_nan_input_is_a_clear_error_naming_the_subject(tmp_path, emt_cohort_dir):
    import shutil

    import h5py

    cohort = tmp_path / "cohort"
    shutil.copytree(emt_cohort_dir, cohort)
    train_ids = json.loads((cohort / "manifest.json").read_text())["splits"]["train"]
    sid = train_ids[0]
    shard = cohort / f"shard-{sid // 16:05d}.h5"
    with h5py.File(shard, "r+") as f:
        off = f["fmri"].id.get_chunk_info_by_coord((sid % 16, 0, 0, 0, 0)).byte_offset
    with open(shard, "r+b") as fh:  # float16 NaN in the middle of that subject's fMRI
        fh.seek(off + 64)
        fh.write(np.array([np.nan], dtype=np.float16).tobytes())
    r = run(train_cmd(tmp_path / "run", cohort, "train.max_epochs=1"), check=False)
    assert r.returncode == 1
    assert "NaN or inf" in r.stderr and f"[{sid}]" in r.stderr and str(cohort) in r.stderr
