"""The shared trainer on the tiny EMT config: DDP, exact resume, signals, DeepSpeed,
early stopping, clear errors.  Real processes, real gloo, real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    cmd = base + [
        "-m",
        "trd_hpc.cli",
        "train",
        TINY,
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        f"data.cohort={cohort}",
        "train.num_threads=1",
        *overrides,
    ]
    if resume:
        cmd.append("--resume")
    return cmd


def run(
    cmd: list[str], timeout: float = 600, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV, **(env or {})}
    )
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
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (
                k,
                (a[k].float() - b[k].float()).abs().max(),
            )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, emt_cohort_dir):
    """An uninterrupted 3-epoch run with step checkpoints (the resume tests compare against it)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2"))
    return out


def test_run_directory_layout_and_metrics(reference):
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "model.pt",
        "predictions/val.npz",
        "predictions/test.npz",
    ):
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


def test_sigusr2_writes_checkpoint_exits_cleanly_and_resumes(tmp_path, emt_cohort_dir, reference):
    # The run sends itself SIGUSR2 right after step 3 (TRD_FAULT_KILL=usr2): the notice is
    # honoured at the next step boundary, so the pre-emption checkpoint is step 4, always.
    out = tmp_path / "run"
    cmd = train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2")
    r = run(cmd, env={"TRD_FAULT": "after-step:3", "TRD_FAULT_KILL": "usr2"})
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGUSR2" and marker["step"] == 4, marker
    assert Path(marker["checkpoint"]).name == "step-000000004.pt" and Path(marker["checkpoint"]).exists()
    assert "continue with --resume auto" in r.stdout
    assert not (out / "model.pt").exists()
    r = run(train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.checkpoint_every_steps=2", resume=True))
    assert "step 4" in r.stdout
    assert not (out / "PREEMPTED").exists()
    assert_same_weights(weights(out), weights(reference))


def test_two_processes_equal_one_accumulating_two_micro_batches_bit_for_bit(tmp_path, emt_cohort_dir):
    # DDP averages the two ranks' gradients (g0 + g1) / 2; one process accumulating the same two
    # micro-batches adds g0 / 2 + g1 / 2.  Halving is exact in floating point and a sum of two
    # terms does not depend on their order, so the weights agree bit for bit (no tolerance):
    # the sampler gives process r of W the micro-batches of virtual ranks r*A .. r*A+A-1.
    # Without dropout, since the ranks draw their masks from their own RNG streams.
    common = ["train.max_epochs=2", "model.dropout=0.0", "model.encoder_dropout=0.0", "train.batch_size=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(train_cmd(one, emt_cohort_dir, *common, "train.grad_accum_steps=2"))
    run(train_cmd(two, emt_cohort_dir, *common, "train.strategy=ddp", nproc=2))
    m1, m2 = metrics(one), metrics(two)
    assert (m1["world_size"], m2["world_size"], m2["strategy"]) == (1, 2, "ddp")
    assert_same_weights(weights(one), weights(two))  # torch.equal, every tensor
    h1, h2 = history(one), history(two)
    assert [r["train.loss"] for r in h1] == [r["train.loss"] for r in h2]  # same samples, same order
    assert m1["steps"] == m2["steps"] and m1["best_epoch"] == m2["best_epoch"]
    for k in ("test.auc", "test.accuracy", "test.ap", "val.auc"):
        assert m1[k] == m2[k], (k, m1[k], m2[k])


def test_accumulating_sampler_gives_a_process_the_micro_batches_of_its_virtual_ranks():
    from trd_hpc.data.sampler import ShardAwareSampler

    sizes, b = [16, 16, 13], 4  # 45 subjects: the last global batch is short and padded
    two = [ShardAwareSampler(sizes, num_replicas=2, rank=r, seed=3, batch_size=b) for r in range(2)]
    acc = ShardAwareSampler(sizes, num_replicas=1, rank=0, seed=3, batch_size=b, accum=2)
    s0, s1, sa = (s.rank_indices() for s in (*two, acc))
    assert len(sa) == len(s0) + len(s1) and len(s0) == len(s1)
    # step k of the accumulating process = rank 0's micro-batch k, then rank 1's
    steps = [(s0[i : i + b], s1[i : i + b]) for i in range(0, len(s0), b)]
    assert sa.tolist() == [int(x) for p0, p1 in steps for x in (*p0, *p1)]
    assert sorted(abs(x) for x in sa.tolist() if x >= 0) == list(range(45))  # each subject once (pads < 0)


def test_the_peak_for_mfu_is_measured_in_the_run_without_touching_its_rng(tmp_path, emt_cohort_dir):
    # Every run measures the matmul rate for MFU in its own process (a figure cached from
    # another moment of a shared machine once gave 176 %); the measurement must not draw
    # from the RNG that drives dropout, and nothing is written outside the run.
    from trd_hpc.train.perf import matmul_flops

    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    r = run(train_cmd(a, emt_cohort_dir, "train.max_epochs=1"), env={"XDG_CACHE_HOME": str(cache)})
    assert not cache.exists() or not list(cache.rglob("*")), "a peak was written outside the run"
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    matmul_flops(torch.device("cpu"), seconds=0.01)
    assert torch.equal(torch.rand(3), before)
    run(train_cmd(b, emt_cohort_dir, "train.max_epochs=1"), env={"XDG_CACHE_HOME": str(cache)})
    assert_same_weights(weights(a), weights(b))
    from trd_hpc.rundir import RunDir

    mfu = [row["train.mfu"] for row in RunDir(a).history()]
    assert all(m != m or 0 < m <= 1 for m in mfu), mfu  # a figure, at most 100 %, or none
    assert "MFU" in r.stdout + r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_then_evaluation_and_baselines(tmp_path, emt_cohort_dir):
    # The README's DDP command without --no-eval: rank 0 evaluates and trains the baselines
    # alone (standalone, while the launcher's RANK/WORLD_SIZE are still set).
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trd_hpc.cli",
        "train",
        TINY,
        "--out",
        str(out),
        "--quiet",
        f"data.cohort={emt_cohort_dir}",
        "train.num_threads=1",
        "train.strategy=ddp",
        "train.max_epochs=2",
        "eval.baselines=[late_fusion_mlp,random_forest]",
    ]
    r = run(cmd)
    m = metrics(out)
    assert (m["world_size"], m["strategy"]) == (2, "ddp")
    for k in ("baselines.late_fusion_mlp.auc", "baselines.random_forest.auc", "calibrated.platt.ece"):
        assert k in m, k
    assert metrics(out / "baselines" / "late_fusion_mlp")["world_size"] == 1
    assert (out / "report.html").exists() and "report:" in r.stdout


def test_ddp_resumes_at_another_world_size(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    run(train_cmd(out, emt_cohort_dir, "train.max_epochs=1", "train.batch_size=4", "train.strategy=ddp", nproc=2))
    r = run(
        train_cmd(out, emt_cohort_dir, "train.max_epochs=2", "train.batch_size=4", "train.strategy=ddp", resume=True)
    )
    assert "resumed from" in r.stdout
    assert [row["epoch"] for row in history(out)] == [1, 2]
    assert metrics(out)["world_size"] == 1


@pytest.mark.slow
# ZeRO-1 resume at every kill point: tests/test_faults.py
@pytest.mark.parametrize("stage", [2])
def test_deepspeed_zero_runs_on_two_processes_and_resumes(tmp_path, emt_cohort_dir, stage):
    pytest.importorskip("deepspeed")
    ds = [
        "train.strategy=deepspeed",
        f"train.deepspeed_config=zero{stage}_bf16.json",
        "train.precision=fp32",
        "train.batch_size=4",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    run(train_cmd(full, emt_cohort_dir, *ds, "train.max_epochs=2", nproc=2))
    run(train_cmd(part, emt_cohort_dir, *ds, "train.max_epochs=1", nproc=2))
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts and (part / "checkpoints" / ckpts[-1] / "complete").exists()
    r = run(train_cmd(part, emt_cohort_dir, *ds, "train.max_epochs=2", nproc=2, resume=True))
    assert "resumed from" in r.stdout
    assert metrics(part)["strategy"] == "deepspeed" and metrics(part)["world_size"] == 2
    assert_same_weights(weights(part), weights(full), exact=False, atol=1e-6)
    # at another number of processes: tests/test_elastic_resume.py (-k elastic_zero2)


def test_early_stopping_restores_the_best_epoch(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    # A high learning rate makes the validation AUC wander so the best epoch is not the last.
    run(
        train_cmd(
            out,
            emt_cohort_dir,
            "train.max_epochs=12",
            "train.lr=0.02",
            "train.early_stopping.patience=3",
            "train.plateau.patience=100",
        )
    )
    h = history(out)
    m = metrics(out)
    aucs = [r["val.auc"] for r in h]
    best = int(np.argmax(aucs)) + 1  # first epoch reaching the maximum
    assert m["best_epoch"] == best
    assert abs(m["val.auc"] - aucs[best - 1]) < 1e-9  # the final model is the best epoch's
    if m["stopped_early"]:
        assert len(h) == best + 3


def test_early_stopping_tie_breaker_keeps_later_epochs_that_tie_on_the_monitor():
    from trd_hpc.train.trainer import EarlyStopping

    epochs = [(0.9, 0.5), (1.0, 0.4), (1.0, 0.3), (1.0, 0.35), (1.0, 0.2), (1.0, 0.25), (0.99, 0.1)]
    strict, tied = EarlyStopping("max", patience=2), EarlyStopping("max", patience=2, tie_mode="min")
    got_strict = [strict.update(acc, e, loss) for e, (acc, loss) in enumerate(epochs, 1)]
    got_tied = [tied.update(acc, e, loss) for e, (acc, loss) in enumerate(epochs, 1)]
    # Without a tie-breaker the first epoch at the ceiling stays the best and patience runs out.
    assert [b for b, _ in got_strict] == [True, True, False, False, False, False, False]
    assert strict.best_epoch == 2 and got_strict[3] == (False, True)
    # With one, equal accuracy and a lower loss is a new best; a worse accuracy never is.
    assert [b for b, _ in got_tied] == [True, True, True, False, True, False, False]
    assert (tied.best, tied.best_tie, tied.best_epoch) == (1.0, 0.2, 5) and got_tied[-1] == (False, True)
    # The tie-breaker's best survives a checkpoint; a state written before it existed loads.
    again = EarlyStopping("max", patience=2, tie_mode="min")
    again.load_state_dict(tied.state_dict())
    assert again == tied
    old = {k: v for k, v in tied.state_dict().items() if k != "best_tie"}
    again.load_state_dict(old)
    assert np.isnan(again.best_tie) and again.improved(1.0, 5.0)


def test_nan_loss_is_a_clear_error_naming_the_step(tmp_path, emt_cohort_dir):
    out = tmp_path / "run"
    r = run(
        train_cmd(out, emt_cohort_dir, "train.max_epochs=3", "train.lr=1e30", "train.checkpoint_every_steps=1"),
        check=False,
    )
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
    # ... and the checksums updated to match, as a tool that wrote NaN on purpose would: so the
    # content check passes and the NaN reaches the model's input check.
    from trd_hpc.data.manifest import load_manifest
    from trd_hpc.data.shards import shard_row_crcs

    man = json.loads((cohort / "manifest.json").read_text())
    man["shards"][sid // 16]["row_crc32"] = shard_row_crcs(shard, load_manifest(cohort).config, 16)
    (cohort / "manifest.json").write_text(json.dumps(man))
    r = run(train_cmd(tmp_path / "run", cohort, "train.max_epochs=1"), check=False)
    assert r.returncode == 1
    assert "NaN or inf" in r.stderr and f"[{sid}]" in r.stderr and str(cohort) in r.stderr


def test_check_finite_names_the_subjects_and_lets_an_overflowing_sum_pass():
    from trd_hpc.tasks.base import NonFiniteInput, check_finite

    batch = {"subject_id": torch.tensor([7, 8, 9])}
    x = torch.zeros(3, 4, 5)
    check_finite("fmri", x, batch, "c")
    big = torch.full((3, 4, 5), 3e38)  # every value finite, the sum is not
    assert not torch.isfinite(big.sum())
    check_finite("fmri", big, batch, "c")
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 3] = bad
        y[2, 0, 0] = bad
        with pytest.raises(
            NonFiniteInput, match=r"input 'fmri' holds NaN or inf for subject\(s\) \[8, 9\] of cohort c"
        ):
            check_finite("fmri", y, batch, "c")


def test_the_optimiser_is_fused_where_pytorch_has_the_kernel():
    from trd_hpc.config import load_config
    from trd_hpc.train.strategy import build_optimizer

    tc = load_config(TINY).train
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([w], tc)
    assert opt.defaults["fused"] is True and opt.defaults["lr"] == tc.lr


def test_bench_train_reports_ours_against_the_bare_loop_and_lightning(tmp_path):
    from tests.conftest import cli

    js = tmp_path / "b.json"
    r = cli("bench", "train", "--config", TINY, "--epochs", "1", "--no-compile", "--json", str(js))
    f = json.loads(js.read_text())
    assert f["lightning"] == "measured" and f["compile"].startswith("off")
    assert f["ratio"] == pytest.approx(f["ours_samples_per_s"] / f["bare_samples_per_s"])
    assert f["ratio_vs_lightning"] == pytest.approx(f["ours_samples_per_s"] / f["lightning_samples_per_s"])
    assert set(f["epoch_seconds"]) == {"bare", "ours", "lightning"}
    assert all(len(v) == 1 and v[0] > 0 for v in f["epoch_seconds"].values())
    assert "ours/Lightning" in r.stdout and "default AdamW" in r.stdout
    # MFU against a peak measured in this run (after the warm-up and after each timed round),
    # the best of the square matmul and the model's own Linear GEMMs: never above 100 %
    assert len(f["square_matmul_measurements"]) == 2 and f["model_gemm_shapes"]
    assert f["peak_flops"] == max(f["square_matmul_flops"], f["model_gemm_flops"])
    assert f["square_matmul_flops"] == max(f["square_matmul_measurements"])
    assert 0 < f["mfu_ours"] <= 1 and 0 < f["mfu_bare"] <= 1
    assert "interleaved with the timed epochs" in r.stdout and "Linear GEMMs" in r.stdout
