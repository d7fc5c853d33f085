"""Training on the real local SLURM cluster: the sbatch scripts (one task, DDP under srun,
pre-emption -> checkpoint -> requeue -> resume) and `trd-hpc submit` through submitit.

Every wait is bounded; the tiny EMT cohort is made once per session (emt_cohort_dir).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cluster.fixtures import slurm_cluster  # noqa: F401
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.slurm
VENV_BIN = Path(sys.executable).parent
TINY = str(CONFIGS / "emt_tiny.yaml")
# No W&B in these jobs (its service process costs seconds per run).
QUICK = ["tracking.wandb=false"]
# model.pt holds the best epoch's weights: with val.loss (falling every epoch here) that is the
# last epoch, so comparing model.pt compares the final weights.
RESUME_CASE = [
    "train.max_epochs=4",
    "train.checkpoint_every_steps=1",
    "train.num_threads=1",
    "train.early_stopping.monitor=val.loss",
    "train.early_stopping.mode=min",
    *QUICK,
]


def job_env(**extra: str) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "TRD_HPC": str(VENV_BIN / "trd-hpc"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return f"({path} missing)"


def sacct_states(cluster, job: int | str) -> list[str]:
    """Every record of the job in the accounting database, requeued attempts included (-D)."""
    res = cluster.run(["sacct", "-n", "-X", "-P", "-D", "-j", str(job), "-o", "State"], timeout=15, check=False)
    return [ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()]


def newest_step(run_dir: Path) -> int:
    steps = (
        [
            int(m.group(1))
            for p in (run_dir / "checkpoints").glob("step-*.pt")
            if (m := re.fullmatch(r"step-(\d+)\.pt", p.name))
        ]
        if (run_dir / "checkpoints").is_dir()
        else []
    )
    return max(steps, default=-1)


# The run stops right after step 3 and waits for a signal (trd_hpc/faults.py), so the
# pre-emption notice always lands mid-run, however loaded the machine is.
PAUSE_AT_3 = {"TRD_FAULT": "after-step:3", "TRD_FAULT_KILL": "pause"}


def wait_for_text(path: Path, text: str, timeout: float, proc=None) -> None:
    """Bounded wait for a line the job prints (not for a moment in training: the job waits too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read(path):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise TimeoutError(f"{path} has no {text!r} after {timeout} s:\n{read(path)[-3000:]}")


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (empty: bit-identical)."""
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


class Reference:
    """An uninterrupted run of RESUME_CASE, started once (in the background) and awaited on demand."""

    def __init__(self, run_dir: Path, cohort: Path):
        self.run_dir, self.log = run_dir, run_dir.parent / "reference.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trd_hpc.cli",
                    "train",
                    TINY,
                    "--out",
                    str(run_dir),
                    "--no-eval",
                    "--quiet",
                    f"data.cohort={cohort}",
                    *RESUME_CASE,
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )

    def model(self, timeout: float = 300) -> Path:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert rc == 0, read(self.log)
        return self.run_dir / "model.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, emt_cohort_dir):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run", emt_cohort_dir)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait(timeout=30)


def test_sbatch_train_emt_one_task_default_out(slurm_cluster, tmp_path, emt_cohort_dir):
    # submitted from another directory: the repository comes from TRD_HPC_ROOT, the run directory
    # defaults to runs/<job name>-<job id> and the log to slurm-<job name>-<job id>.out there
    job = slurm_cluster.sbatch(
        [
            "--cpus-per-task=1",
            str(REPO / "slurm" / "train_emt.sh"),
            TINY,
            "--no-eval",
            "train.max_epochs=2",
            f"data.cohort={emt_cohort_dir}",
            *QUICK,
        ],
        cwd=tmp_path,
        env=job_env(TRD_HPC_ROOT=str(REPO)),
        wait=True,
        timeout=300,
    )
    log = read(tmp_path / f"slurm-trd-train-emt-{job}.out")
    assert slurm_cluster.job_state(job) == "COMPLETED", log
    run = tmp_path / "runs" / f"trd-train-emt-{job}"
    m = json.loads((run / "metrics.json").read_text())
    assert (m["epochs_run"], m["world_size"], m["strategy"]) == (2, 1, "single"), m
    assert "no checkpoint yet: starting from scratch" in log  # --resume auto on a fresh run
    assert not (run / "PREEMPTED").exists()


def test_sbatch_ddp_two_tasks_under_srun(slurm_cluster, tmp_path, emt_cohort_dir):
    # With the evaluation stage: after the two ranks finish, rank 0 trains the baselines alone.
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        [
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--output={log}",
            "slurm/train_emt.sh",
            TINY,
            "--out",
            str(out),
            "train.max_epochs=1",
            "eval.baselines=[late_fusion_mlp]",
            f"data.cohort={emt_cohort_dir}",
            *QUICK,
        ],
        cwd=REPO,
        env=job_env(),
        wait=True,
        timeout=600,
    )
    text = read(log)
    assert slurm_cluster.job_state(job) == "COMPLETED", text
    m = json.loads((out / "metrics.json").read_text())
    assert (m["world_size"], m["strategy"]) == (2, "ddp"), m  # ddp chosen because SLURM_NTASKS=2
    assert "baselines.late_fusion_mlp.auc" in m and (out / "report.html").exists(), text[-3000:]
    assert f":{15000 + job % 15000}" in text  # MASTER_PORT from the job id (launch.plan.slurm_port)


def test_sbatch_preempted_job_requeues_and_resumes_to_the_same_weights(
    slurm_cluster, tmp_path, emt_cohort_dir, reference
):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        [
            "--cpus-per-task=1",
            f"--output={log}",
            "slurm/train_emt.sh",
            TINY,
            "--out",
            str(out),
            "--no-eval",
            f"data.cohort={emt_cohort_dir}",
            *RESUME_CASE,
        ],
        cwd=REPO,
        env=job_env(**PAUSE_AT_3),
    )
    try:
        wait_for_text(log, "TRD_FAULT: paused at after-step:3", timeout=300)
        step = 3
        # SIGUSR2 to the job steps (the srun tasks), as --signal=USR2@120 sends before the time limit
        slurm_cluster.run(["scancel", "--signal=USR2", str(job)])
        state = slurm_cluster.wait_job(job, timeout=300)
    finally:
        slurm_cluster.run(["scancel", str(job)], check=False)
    text = read(log)
    assert state == "COMPLETED", text
    assert "requeueing job" in text and "resumed from" in text, text
    assert sacct_states(slurm_cluster, job)[:1] == ["REQUEUED"], sacct_states(slurm_cluster, job)
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 4 and m["steps"] > step
    assert same_weights(out / "model.pt", reference.model()) == []


def submit_cmd(*args: str) -> list[str]:
    return [str(VENV_BIN / "trd-hpc"), "submit", *args]


def test_submit_train_on_slurm_waits_for_the_result(slurm_cluster, tmp_path, emt_cohort_dir):
    out, logs = tmp_path / "run", tmp_path / "logs"
    res = subprocess.run(
        submit_cmd(
            "train",
            TINY,
            "--cluster",
            "slurm",
            "--wait",
            "--wait-timeout",
            "300",
            "--out",
            str(out),
            "--logs",
            f"{logs}/%j",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
            "--no-eval",
            "train.max_epochs=1",
            f"data.cohort={emt_cohort_dir}",
            *QUICK,
        ),
        cwd=REPO,
        env=slurm_cluster.client_env(job_env()),
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"submitted slurm job (\d+)", res.stdout).group(1)
    assert f"{logs}/{job}/{job}_0_log.out" in res.stdout  # where the logs are
    assert "epoch 1 " in res.stdout  # the log, streamed while waiting
    assert re.search(r"^final: test\.auc \S+ .*world_size 1", res.stdout, re.M), res.stdout
    assert (out / "metrics.json").exists()
    # the result file comes first; the job ends (srun, the batch script) a moment later
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED"


def test_submit_preempted_job_is_requeued_by_submitit_and_resumes(slurm_cluster, tmp_path, emt_cohort_dir, reference):
    out, logs = tmp_path / "run", tmp_path / "logs"
    name = f"trd-submit-{os.getpid()}-{time.monotonic_ns()}"
    with open(tmp_path / "submit.log", "w") as sink:
        proc = subprocess.Popen(
            submit_cmd(
                "train",
                TINY,
                "--cluster",
                "slurm",
                "--wait",
                "--wait-timeout",
                "400",
                "--out",
                str(out),
                "--logs",
                f"{logs}/%j",
                "--name",
                name,
                "--cpus-per-task",
                "1",
                "--time",
                "30",
                "--no-eval",
                f"data.cohort={emt_cohort_dir}",
                *RESUME_CASE,
            ),
            cwd=REPO,
            env=slurm_cluster.client_env(job_env(**PAUSE_AT_3)),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    job = None
    try:
        wait_for_text(tmp_path / "submit.log", "submitted slurm job", timeout=120, proc=proc)
        job = re.search(r"submitted slurm job (\d+)", read(tmp_path / "submit.log")).group(1)
        # the job's stderr (submit --wait streams its stdout only)
        wait_for_text(logs / job / f"{job}_0_log.err", "TRD_FAULT: paused at after-step:3", timeout=300, proc=proc)
        step = 3
        slurm_cluster.run(["scancel", "--signal=USR2", job])  # what SLURM sends signal_delay s before the limit
        rc = proc.wait(timeout=420)
        # the result file comes first; the job ends (srun, the batch script) a moment later
        state = slurm_cluster.wait_job(job, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if job:
            slurm_cluster.run(["scancel", job], check=False)
    text = read(tmp_path / "submit.log")
    assert rc == 0 and state == "COMPLETED", text
    # submitit's log lines are in the job's stdout, which `submit --wait` streams
    assert "requeueing through submitit" in text and "this job is preempted" in text and "Requeued job" in text, text
    assert "resumed from" in text and re.search(r"^final: ", text, re.M), text
    assert sacct_states(slurm_cluster, job)[:1] == ["REQUEUED"]
    assert newest_step(out) > step
    assert same_weights(out / "model.pt", reference.model()) == []


def test_sbatch_cv_array_one_fold_per_task_and_summary(slurm_cluster, tmp_path):
    from trd_hpc.config import load_config
    from trd_hpc.data.generate import generate

    tiny = str(CONFIGS / "cnn3d_tiny.yaml")
    small = ["cohort.n_subjects=96", "cohort.split.folds=2"]
    cohort, out = tmp_path / "cohort", tmp_path / "cv"
    generate(load_config(tiny, small).cohort, cohort, progress=False)  # once, not by two tasks at a time
    args = [tiny, "--out", str(out), *small, f"data.cohort={cohort}", "train.max_epochs=1", *QUICK]
    job = slurm_cluster.sbatch(
        ["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/cv-%a.out", "slurm/cv_cnn3d.sh", *args],
        cwd=REPO,
        env=job_env(),
    )
    # the summary again once every fold is done: a dependent job, not an array
    agg = slurm_cluster.sbatch(
        [
            f"--dependency=afterok:{job}",
            "--cpus-per-task=1",
            f"--output={tmp_path}/agg.out",
            "slurm/cv_cnn3d.sh",
            *args,
            "--aggregate",
        ],
        cwd=REPO,
        env=job_env(),
    )
    try:
        states = slurm_cluster.array_records(job, 2, timeout=300)
        logs = "\n".join(read(tmp_path / f"cv-{k}.out") for k in range(2))
        assert states == {f"{job}_0": ["COMPLETED"], f"{job}_1": ["COMPLETED"]}, logs
        assert slurm_cluster.wait_job(agg, timeout=120) == "COMPLETED", read(tmp_path / "agg.out")
    finally:
        slurm_cluster.run(["scancel", str(job), str(agg)], check=False)
    for k in range(2):
        assert json.loads((out / f"fold-{k}" / "metrics.json").read_text())["epochs_run"] == 1
    assert "2-fold cross-validation" in logs  # written by the task that finished last
    assert "2-fold cross-validation" in read(tmp_path / "agg.out")
    s = json.loads((out / "cv_summary.json").read_text())
    assert s["folds"] == 2 and len(s["per_fold.test.accuracy"]) == 2
