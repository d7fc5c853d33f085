"""Exact resume at every kill point.

A run is killed at a named point (``TRD_FAULT``, see trd_hpc/faults.py), resumed
with ``--resume auto`` and compared with an uninterrupted run of the same config:
final weights bit for bit (BatchNorm buffers included), every deterministic
field of metrics.jsonl (train metrics of resumed epochs too) and metrics.json,
the same early-stop epoch.  Nothing here waits for a file to appear: the
process kills itself at the point, whatever the machine's load.

* quick: single-process EMT, one test per point, for a few points;
* slow: every point, for single / DDP x2 / DeepSpeed ZeRO-1 x2 on the tiny EMT and
  3-D CNN configs, as chains (kill at point 1, resume and kill at point 2, ...,
  resume to the end), so each run is also killed many times over.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import CONFIGS, REPO
from trd_hpc.bench.faults import compare_runs, train_command

EMT = str(CONFIGS / "emt_tiny.yaml")
CNN = str(CONFIGS / "cnn3d_tiny.yaml")
# EMT tiny: 45 training subjects, batch 8 -> 6 steps an epoch; AUC 1.0 after epoch 1,
# so patience 2 stops early after epoch 3 (the early-stop epoch is compared too).
EMT_RUN = [
    "train.max_epochs=5",
    "train.early_stopping.patience=2",
    "train.checkpoint_every_steps=2",
    "train.num_threads=1",
]
CNN_RUN = ["train.max_epochs=3", "train.checkpoint_every_steps=3", "train.num_threads=1"]
STRATEGIES = {
    "single": (1, []),
    "ddp": (2, ["train.strategy=ddp"]),
    "zero1": (2, ["train.strategy=deepspeed", "train.deepspeed_config=zero1_bf16.json", "train.precision=fp32"]),
}
# Per-rank batch halves with 2 ranks, so the global batch and the steps per epoch stay the same.
BATCH = {EMT: 8, CNN: 16}


def _env(fault: str | None, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRD_FAULT", None)
    if fault:
        env["TRD_FAULT"] = fault
        # With several ranks the whole process group dies at once (launcher included), as on a lost node.
        env["TRD_FAULT_KILL"] = "group" if nproc > 1 else "self"
    return env


def _run(cmd: list[str], fault: str | None, nproc: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=_env(fault, nproc), capture_output=True, text=True, timeout=900, start_new_session=True
    )


def overrides_for(config: str, strategy: str) -> tuple[int, list[str]]:
    nproc, extra = STRATEGIES[strategy]
    base = EMT_RUN if config == EMT else CNN_RUN
    return nproc, [*base, *extra, f"train.batch_size={BATCH[config] // nproc}"]


def finished_run(out, cohort, config: str, strategy: str, evaluate: bool = False, extra=()):
    nproc, ov = overrides_for(config, strategy)
    r = _run(train_command(config, out, cohort, [*ov, *extra], nproc, evaluate=evaluate), None, nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


def kill_chain(out, cohort, config: str, strategy: str, points: list[str], evaluate: bool = False, extra=()) -> None:
    """Start, die at points[0]; resume, die at points[1]; ...; resume to the end."""
    nproc, ov = overrides_for(config, strategy)
    for i, point in enumerate([*points, None]):
        cmd = train_command(config, out, cohort, [*ov, *extra], nproc, resume=i > 0, evaluate=evaluate)
        r = _run(cmd, point, nproc)
        log = f"[{strategy} {os.path.basename(config)} point {point or 'none'}]\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        if point is None:
            assert r.returncode == 0, log
        else:
            assert r.returncode != 0 and f"TRD_FAULT: dying at {point}" in r.stderr, (
                f"the run did not die at {point} (exit {r.returncode})\n{log}"
            )


def assert_same_run(ref, out) -> None:
    diffs = compare_runs(ref, out)
    assert not diffs, "\n".join(diffs[:20])


# ---------------------------------------------------------------------------- quick: one point each
@pytest.fixture(scope="module")
def emt_reference(tmp_path_factory, emt_cohort_dir):
    return finished_run(tmp_path_factory.mktemp("faults") / "ref", emt_cohort_dir, EMT, "single")


@pytest.mark.parametrize("point", ["after-step:8", "checkpoint-write:3", "epoch-end:2:before-val"])
def test_killed_at_a_point_resumes_bit_identical(tmp_path, emt_cohort_dir, emt_reference, point):
    out = tmp_path / "run"
    kill_chain(out, emt_cohort_dir, EMT, "single", [point])
    assert_same_run(emt_reference, out)


def test_early_stop_epoch_is_part_of_the_comparison(emt_reference):
    import json

    m = json.loads((emt_reference / "metrics.json").read_text())
    assert m["stopped_early"] is True and m["epochs_run"] == 3 and m["best_epoch"] == 1, m


# ---------------------------------------------------------------------------- slow: every point
# EMT (6 steps an epoch, a checkpoint every 2 steps and at each epoch end, the two newest kept).
# Counted points (checkpoint-*, prune, model-*, metrics-*) count in the process that was resumed.
EMT_POINTS = [
    "after-step:3",  # between checkpoints
    "mid-step:5",  # after backward, before the optimiser step
    "checkpoint-write:1",  # epoch 1's end checkpoint written to its temp name, not renamed
    "epoch-end:1:before-val",  # after precise-BN, before validation
    "checkpoint-rename:1",  # epoch 1's checkpoint renamed, older ones not yet pruned
    "prune:1",  # half-way through pruning
    "epoch-end:2:before-bn",
    "epoch-end:2:before-save",  # metrics.jsonl already has epoch 2's row, its checkpoint not yet written
    "after-step:14",  # a checkpoint step, killed before that checkpoint
    "epoch-end:3:before-save",  # the early-stop decision taken, not yet saved
    "model-write:1",  # training done, model.pt half-written
    "metrics-write:1",  # model.pt written, metrics.json not
]
CNN_POINTS = [  # 11 steps an epoch, a checkpoint every 3 steps
    "mid-step:4",
    "after-step:10",  # the epoch's last mid-epoch checkpoint written (step 9), not yet at its end
    "checkpoint-write:1",  # epoch 1's end checkpoint
    "epoch-end:2:before-bn",  # precise-BN recomputes the BatchNorm buffers after this
    "epoch-end:2:before-val",
    "checkpoint-rename:2",
    "prune:1",
    "after-step:30",
    "model-write:1",
]


def _points(config: str, strategy: str) -> list[str]:
    # DeepSpeed's checkpoints differ (a directory per step with every rank's files, then a
    # `complete` marker: checkpoint-write dies between the two), the points are the same.
    return EMT_POINTS if config == EMT else CNN_POINTS


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model", ["emt", "cnn3d"])
def test_every_fault_point_resumes_bit_identical(tmp_path, emt_cohort_dir, volume_cohort_dir, model, strategy):
    if strategy == "zero1":
        pytest.importorskip("deepspeed")
    config, cohort = (EMT, emt_cohort_dir) if model == "emt" else (CNN, volume_cohort_dir)
    ref = finished_run(tmp_path / "ref", cohort, config, strategy)
    out = tmp_path / "run"
    kill_chain(out, cohort, config, strategy, _points(config, strategy))
    assert_same_run(ref, out)


@pytest.mark.slow
def test_kills_during_evaluation_and_report_resume_to_the_same_metrics(tmp_path, emt_cohort_dir):
    # The evaluation stage (calibration, importance, the LF-MLP baseline, figures, report) killed, then resumed.
    extra = ["eval.baselines=[late_fusion_mlp]"]
    ref = finished_run(tmp_path / "ref", emt_cohort_dir, EMT, "single", evaluate=True, extra=extra)
    out = tmp_path / "run"
    kill_chain(
        out, emt_cohort_dir, EMT, "single", ["evaluate", "checkpoint-write:1", "report"], evaluate=True, extra=extra
    )
    assert_same_run(ref, out)
    assert (out / "report.html").exists()
