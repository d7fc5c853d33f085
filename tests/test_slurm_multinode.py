"""One job across two SLURM nodes: the two-node local cluster (slurm_two_nodes), nodes trdXXXXXn1 and
trdXXXXXn2 (named per cluster) in their own network namespaces, so every rank, Ray worker and array
task that runs on the second node talks to the first over the private LAN, as on a real cluster.

``pytest -m multinode`` runs just these. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.fixtures import slurm_two_nodes  # noqa: F401
from tests.conftest import CONFIGS, REPO
from tests.test_generate import read_all
from tests.test_slurm_train import (
    PAUSE_AT_3,
    QUICK,
    TINY,
    VENV_BIN,
    job_env,
    read,
    sacct_states,
    same_weights,
    submit_cmd,
    wait_for_text,
)

pytestmark = pytest.mark.multinode

# Without dropout, two ranks equal one process accumulating their two micro-batches bit for bit
# (tests/test_trainer.py explains why), wherever the ranks run.
EXACT = [
    "train.max_epochs=2",
    "model.dropout=0.0",
    "model.encoder_dropout=0.0",
    "train.batch_size=4",
    "train.num_threads=1",
    "train.checkpoint_every_steps=1",
    *QUICK,
]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]


def train_job(cluster, tmp_path: Path, name: str, cohort: Path, alloc: list[str], env=None) -> tuple[int, Path, Path]:
    out, log = tmp_path / name, tmp_path / f"{name}.out"
    job = cluster.sbatch(
        [*alloc, f"--output={log}", "slurm/train_emt.sh", TINY, "--out", str(out), "--no-eval"]
        + [f"data.cohort={cohort}", *EXACT],
        cwd=REPO,
        env=env or job_env(),
    )
    return job, out, log


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, emt_cohort_dir):
    """The EXACT case in one local process accumulating two micro-batches: what every
    two-rank run below must equal. Started in the background, awaited by the first user."""
    run = tmp_path_factory.mktemp("one") / "run"
    log = run.parent / "train.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trd_hpc.cli", "train", TINY, "--out", str(run), "--no-eval", "--quiet"]
            + [f"data.cohort={emt_cohort_dir}", *EXACT, "train.grad_accum_steps=2"],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def result() -> Path:
        assert proc.wait(timeout=600) == 0, read(log)
        return run

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_cluster_has_two_nodes_on_their_own_addresses(slurm_two_nodes, tmp_path):  # noqa: F811
    log = tmp_path / "hosts.out"
    job = slurm_two_nodes.sbatch(
        [*TWO_NODES, f"--output={log}", "--wrap", "srun bash -c 'echo $SLURM_PROCID $(hostname) $(hostname -i)'"],
        cwd=tmp_path,
        wait=True,
        timeout=120,
    )
    assert slurm_two_nodes.job_state(job) == "COMPLETED", read(log)
    net = slurm_two_nodes.net
    n1, n2 = slurm_two_nodes.node_names
    rows = sorted(read(log).split("\n"))
    assert [r for r in rows if r] == [f"0 {n1} {net.addr(1)}", f"1 {n2} {net.addr(2)}"], read(log)


def test_ddp_across_two_nodes_equals_one_node_and_one_process(slurm_two_nodes, tmp_path, emt_cohort_dir, one_process):  # noqa: F811
    cluster = slurm_two_nodes
    n1, n2 = cluster.node_names
    a_job, a, a_log = train_job(cluster, tmp_path, "two_nodes", emt_cohort_dir, TWO_NODES)
    b_job, b, b_log = train_job(
        cluster, tmp_path, "one_node", emt_cohort_dir, ["--nodes=1", "--ntasks=2", "--cpus-per-task=1"]
    )
    try:
        assert cluster.wait_job(a_job, timeout=600) == "COMPLETED", read(a_log)[-4000:]
        assert cluster.wait_job(b_job, timeout=600) == "COMPLETED", read(b_log)[-4000:]
    finally:
        cluster.run(["scancel", str(a_job), str(b_job)], check=False)
    ma, mb = metrics(a), metrics(b)
    assert (ma["world_size"], ma["strategy"], ma["hosts"]) == (2, "ddp", [n1, n2]), ma
    assert mb["hosts"] in ([n1, n1], [n2, n2]), mb
    # rank 0's rendezvous: the first node by name, which resolves to its LAN address on both nodes
    assert re.search(rf"rendezvous {n1}:\d+", read(a_log)), read(a_log)[-3000:]
    one = one_process()
    assert same_weights(a / "model.pt", b / "model.pt") == []
    assert same_weights(a / "model.pt", one / "model.pt") == []
    m1 = metrics(one)
    for k in ("steps", "best_epoch", "test.auc", "test.accuracy", "test.ap", "val.auc"):
        assert ma[k] == m1[k] == mb[k], (k, ma[k], m1[k], mb[k])


def test_two_node_job_preempted_requeues_and_resumes_to_the_same_weights(
    slurm_two_nodes,  # noqa: F811
    tmp_path,
    emt_cohort_dir,
    one_process,
):
    cluster = slurm_two_nodes
    job, out, log = train_job(cluster, tmp_path, "preempted", emt_cohort_dir, TWO_NODES, env=job_env(**PAUSE_AT_3))
    try:
        wait_for_text(log, "TRD_FAULT: paused at after-step:3", timeout=300)
        # to every task on both nodes, as --signal=USR2@120 does before the time limit
        cluster.run(["scancel", "--signal=USR2", str(job)])
        state = cluster.wait_job(job, timeout=400)
    finally:
        cluster.run(["scancel", str(job)], check=False)
    text = read(log)
    assert state == "COMPLETED", text[-4000:]
    assert "requeueing job" in text and "resumed from" in text, text[-4000:]
    assert sacct_states(cluster, job)[:1] == ["REQUEUED"], sacct_states(cluster, job)
    m = metrics(out)
    assert m["hosts"] == cluster.node_names and m["steps"] > 3, m
    assert same_weights(out / "model.pt", one_process() / "model.pt") == []


def test_submit_train_on_two_nodes(slurm_two_nodes, tmp_path, emt_cohort_dir, one_process):  # noqa: F811
    out, logs = tmp_path / "run", tmp_path / "logs"
    res = subprocess.run(
        submit_cmd(
            "train",
            TINY,
            "--cluster",
            "slurm",
            "--wait",
            "--wait-timeout",
            "500",
            "--out",
            str(out),
            "--logs",
            f"{logs}/%j",
            "--nodes",
            "2",
            "--tasks-per-node",
            "1",
            "--cpus-per-task",
            "1",
            "--time",
            "15",
            "--no-eval",
            f"data.cohort={emt_cohort_dir}",
            *EXACT,
        ),  # fmt: skip
        cwd=REPO,
        env=slurm_two_nodes.client_env(job_env()),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    job = re.search(r"submitted slurm job (\d+)", res.stdout).group(1)
    m = metrics(out)
    assert (m["world_size"], m["strategy"], m["hosts"]) == (2, "ddp", slurm_two_nodes.node_names), m
    assert same_weights(out / "model.pt", one_process() / "model.pt") == []
    assert slurm_two_nodes.wait_job(job, timeout=60) == "COMPLETED"


def test_tune_script_places_trials_on_both_nodes(slurm_two_nodes, volume_cohort_dir, tmp_path):  # noqa: F811
    from tests.test_tune import OBJECT_STORE, trial_runs, write_spec

    cpus = slurm_two_nodes.cpus
    # each trial takes a whole node's CPUs: two trials at a time run one on each node
    spec = write_spec(
        tmp_path / "spec.yaml", num_samples=4, max_t=2, grace_period=1, max_concurrent=2,
        resources_per_trial={"cpu": cpus},
    )  # fmt: skip
    out, log = tmp_path / "out", tmp_path / "job.out"
    env = job_env(TRD_HPC=str(VENV_BIN / "trd-hpc"), RAY_OBJECT_STORE_BYTES=str(OBJECT_STORE))
    job = slurm_two_nodes.sbatch(
        ["--nodes=2", f"--cpus-per-task={cpus}", "--mem-per-cpu=1G", f"--output={log}", "slurm/tune.sh"]
        + [str(spec), str(out), "--quiet", f"data.cohort={volume_cohort_dir}"],
        cwd=REPO,
        env=env,
        wait=True,
        timeout=600,
    )
    text = read(log)
    assert slurm_two_nodes.job_state(job) == "COMPLETED", text[-4000:]
    net = slurm_two_nodes.net
    n1, n2 = slurm_two_nodes.node_names
    assert f"ray head on {n1} ({net.addr(1)}:" in text and f"workers on {n2}" in text, text[-4000:]
    state = json.loads((out / "sweep_state.json").read_text())
    assert state["finished"] is True and state["scheduler"] == "asha", state
    trials = [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*/trial.json"))]
    assert len(trials) == 4
    assert {t["host"] for t in trials} == {n1, n2}, [t["host"] for t in trials]
    assert len({t["node_id"] for t in trials}) == 2
    epochs = list(trial_runs(out).values())
    assert sorted(map(len, epochs)) in ([1, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2]) and [1, 2] in epochs, epochs


def test_generate_array_over_two_nodes_makes_the_same_cohort_as_one_process(slurm_two_nodes, tmp_path, emt_tiny):  # noqa: F811
    from trd_hpc.data.generate import generate
    from trd_hpc.data.validate import validate_cohort_dir

    out, logs = tmp_path / "cohort", tmp_path / "logs"
    logs.mkdir()
    cpus = slurm_two_nodes.cpus
    # each task takes a whole node: the first two tasks start together, one on each node
    job = slurm_two_nodes.sbatch(
        ["--array=0-3", f"--cpus-per-task={cpus}", "--mem-per-cpu=1G", f"--output={logs}/gen-%A_%a.out"]
        + ["slurm/generate.sh", str(CONFIGS / "emt_tiny.yaml"), str(out)],
        cwd=REPO,
        env=job_env(),
    )
    deadline = time.monotonic() + 400
    while any(j.split("_")[0] == str(job) for j in slurm_two_nodes.active_jobs()):
        assert time.monotonic() < deadline, f"array job {job} still active"
        time.sleep(0.5)
    log_text = "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert (out / "manifest.json").exists(), log_text
    assert validate_cohort_dir(out, progress=False) == []
    recs = slurm_two_nodes.array_records(job, 4, fields=("NodeList",))
    assert [s for s, _ in recs.values()] == ["COMPLETED"] * 4, recs
    assert {node for _, node in recs.values()} == set(slurm_two_nodes.node_names), recs
    ref = tmp_path / "ref"
    generate(emt_tiny.cohort, ref, num_shards=1, progress=False)
    a, b = read_all(out), read_all(ref)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
