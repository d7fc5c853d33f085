"""Rank and rendezvous derived from SLURM; precision paths on CPU."""

import json

import pytest

from tests.conftest import CONFIGS, cli
from trd_hpc.train.plan import env_from_slurm, first_host, implied_overrides, slurm_port, slurm_tasks


def test_env_from_slurm_tasks():
    env = env_from_slurm(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(slurm_port("123456")) and 15000 <= int(env["MASTER_PORT"]) < 30000


def test_env_from_slurm_keeps_an_explicit_master_and_ignores_non_slurm():
    env = env_from_slurm(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "a1,b2",
            "SLURM_JOB_ID": "9",
            "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "2222",
        }
    )
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["MASTER_PORT"] == "2222"
    assert env_from_slurm({"PATH": "/bin"}) == {}


@pytest.mark.parametrize("nodelist,first", [("node[01-04],gpu7", "node01"), ("cn12", "cn12"), ("x[3,5-6]", "x3")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, emt_cohort_dir, precision):
    out = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=2",
        f"train.precision={precision}",
        "train.num_threads=1",
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["precision"] == precision
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train.loss"] == r["train.loss"] for r in rows)  # finite, not NaN
    assert rows[-1]["train.loss"] < rows[0]["train.loss"] + 0.05


def test_the_launch_plan_implies_ddp_and_threads_once():
    # several tasks, a config that says single: DDP; the CPUs per task become the torch threads
    assert implied_overrides(["a.b=1"], 4, 8, "single") == ["a.b=1", "train.strategy=ddp", "train.num_threads=8"]
    # the user's (or the config's) choice stands
    assert implied_overrides(["train.strategy=deepspeed"], 4, None, "single") == ["train.strategy=deepspeed"]
    assert implied_overrides([], 4, None, "deepspeed") == []
    assert implied_overrides(["train.num_threads=2"], 1, 8, "single") == ["train.num_threads=2"]
    # the srun task's view of its step; outside SLURM one task
    assert slurm_tasks({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "3"}) == (2, 3)
    assert slurm_tasks({"PATH": "/bin"}) == (1, None)
    assert slurm_port("123_4") == slurm_port("1234")  # an array task's id: its digits
