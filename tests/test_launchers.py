"""The Launcher protocol's second implementation: `trd-hpc submit --cluster kubernetes` writes a
Job manifest, checked here by what it holds, and every command line it puts in a pod is one the
CLI parses as the same verb (the one verb table, trd_hpc.launch.verbs)."""

from __future__ import annotations

import yaml

from tests.conftest import CONFIGS, cli
from trd_hpc.launch.verbs import VERBS, job_argv


def _parse(argv: list[str]):
    from trd_hpc.cli import build_parser

    args, extra = build_parser().parse_known_args(argv)
    return args, extra


def test_both_launchers_implement_the_protocol():
    from trd_hpc.launch.kubernetes import KubernetesLauncher
    from trd_hpc.launch.submit import SubmititLauncher, launcher_for
    from trd_hpc.launch.verbs import Launcher

    assert isinstance(KubernetesLauncher(), Launcher) and isinstance(SubmititLauncher(), Launcher)
    assert launcher_for("kubernetes").name == "kubernetes" and launcher_for("slurm").name == "submitit"


def test_every_verb_of_the_table_is_a_command_the_cli_takes(tmp_path):
    opts = {"no_eval": True, "folds": 5, "fold": 2, "workers": 3, "cohort": "data/c", "split": "val"}
    for verb in VERBS:
        argv = job_argv(verb, "configs/emt_tiny.yaml", "runs/x", ["train.lr=0.01"] if verb != "predict" else [], opts)
        args, extra = _parse(argv)
        assert args.cmd == verb and args.out == "runs/x", argv
        if verb == "train":
            assert args.resume == "auto" and args.no_eval and extra == ["train.lr=0.01"]
        if verb == "cv":
            assert (args.folds, args.fold) == (5, 2)
        if verb == "predict":
            assert (args.cohort, args.split) == ("data/c", "val")


def test_a_multi_node_training_becomes_an_indexed_job_with_torchrun(tmp_path):
    out = tmp_path / "job.yaml"
    r = cli(
        "submit",
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--cluster",
        "kubernetes",
        "--image",
        "registry.example/trd-hpc:0.1",
        "--nodes",
        "2",
        "--tasks-per-node",
        "4",
        "--cpus-per-task",
        "2",
        "--gpus-per-node",
        "4",
        "--mem-gb",
        "64",
        "--pvc",
        "trd-work",
        "--namespace",
        "psych",
        "--out",
        "runs/emt",
        "--manifest",
        str(out),
        "train.lr=0.001",
    )
    assert f"kubectl -n psych apply -f {out}" in r.stdout
    service, job = yaml.safe_load_all(out.read_text())
    name = job["metadata"]["name"]
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["metadata"]["namespace"] == "psych" and name == "trd-train-emt-tiny"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["podFailurePolicy"]["rules"][0]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 4}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "trd-work"
    cmd = c["command"]
    assert cmd[:6] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={name}-0.{name}",
        "--master-port=29500",
    ]
    i = cmd.index("trd_hpc.cli")
    args, extra = _parse(cmd[i + 1 :])
    assert args.cmd == "train" and args.out == "runs/emt" and args.resume == "auto"
    # what the resources imply, as submitit jobs get it: DDP, threads = CPUs per task
    assert {"train.lr=0.001", "train.strategy=ddp", "train.num_threads=2"} <= set(extra)
    assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in c["env"])


def test_cv_is_one_pod_per_fold_and_bad_requests_are_refused_before_writing(tmp_path):
    out = tmp_path / "cv.yaml"
    cli(
        "submit",
        "cv",
        str(CONFIGS / "cnn3d_tiny.yaml"),
        "--cluster",
        "kubernetes",
        "--image",
        "img",
        "--manifest",
        str(out),
    )
    (job,) = yaml.safe_load_all(out.read_text())
    assert job["spec"]["completions"] == 5 and job["spec"]["completionMode"] == "Indexed"
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["trd-hpc", "cv"] and cmd[cmd.index("--fold") + 1] == "$(JOB_COMPLETION_INDEX)"

    no_image = cli(
        "submit",
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--cluster",
        "kubernetes",
        "--manifest",
        str(tmp_path / "a.yaml"),
        check=False,
    )
    assert no_image.returncode != 0 and "--image" in no_image.stderr and not (tmp_path / "a.yaml").exists()
    bad_key = cli(
        "submit",
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--cluster",
        "kubernetes",
        "--image",
        "img",
        "--manifest",
        str(tmp_path / "b.yaml"),
        "train.nope=1",
        check=False,
    )
    assert bad_key.returncode != 0 and "train.nope" in bad_key.stderr and not (tmp_path / "b.yaml").exists()
    two = cli(
        "submit",
        "generate",
        str(CONFIGS / "emt_tiny.yaml"),
        "--cluster",
        "kubernetes",
        "--image",
        "img",
        "--tasks-per-node",
        "2",
        "--manifest",
        str(tmp_path / "c.yaml"),
        check=False,
    )
    assert two.returncode != 0 and "runs one task" in two.stderr
