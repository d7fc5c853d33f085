"""``trd-hpc submit VERB CONFIG --cluster kubernetes --image IMAGE``: the job as a Kubernetes
manifest (written, not applied: ``kubectl apply -f FILE``), the second Launcher beside submitit.

What the manifest holds, and why:
* one container per pod running the verb's ``trd-hpc`` command line (trd_hpc.launch.verbs), under
  ``torchrun`` when the job has several processes: ``--standalone`` on one node; on N nodes an
  Indexed Job of N pods with a headless Service, node rank = the pod's completion index and the
  rendezvous at pod 0 (``NAME-0.NAME``), the pattern Kubernetes documents for PyTorch;
* cv: one pod per fold (an Indexed Job, fold = completion index), as SLURM gets one array task each;
* pre-emption: a pod gets SIGTERM and ``terminationGracePeriodSeconds`` (= --signal-delay) to
  write its checkpoint; evictions (condition DisruptionTarget) do not count against
  ``backoffLimit`` (= --max-timeouts), and the replacement pod resumes (``--resume auto``);
* ``--pvc CLAIM``: the claim is the working directory, so relative paths (configs, --out) are
  the same for every pod; without it the paths must exist in the image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from trd_hpc.errors import ConfigError
from trd_hpc.launch.verbs import job_argv, plan_jobs

WORKDIR = "/workspace"
MASTER_PORT = 29500
INDEX_ENV = "JOB_COMPLETION_INDEX"


def dns_name(s: str) -> str:
    """A valid Kubernetes object name (RFC 1123 label, 63 characters at most)."""
    n = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")[:63].strip("-")
    if not n:
        raise ConfigError(f"--name {s!r}: no letters or digits for a Kubernetes name")
    return n


def _plan(a) -> tuple[list[str], int]:
    """(trd-hpc arguments, completions): one pod's command; cv over every fold is one Indexed
    Job whose pods take their fold from the completion index."""
    jobs = plan_jobs(a)
    p = jobs[0]
    options = {**p.options, "fold": f"$({INDEX_ENV})"} if len(jobs) > 1 else p.options
    return job_argv(p.verb, p.config, p.out, p.overrides, options), len(jobs)


def _command(a, argv: list[str], name: str) -> list[str]:
    if a.tasks_per_node * a.nodes == 1:
        return ["trd-hpc", *argv]
    if a.nodes == 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={a.tasks_per_node}", "-m", "trd_hpc.cli", *argv]
    return [
        "torchrun",
        f"--nnodes={a.nodes}",
        f"--nproc-per-node={a.tasks_per_node}",
        f"--node-rank=$({INDEX_ENV})",
        f"--master-addr={name}-0.{name}",
        f"--master-port={MASTER_PORT}",
        "-m",
        "trd_hpc.cli",
        *argv,
    ]


def manifests(a) -> list[dict]:
    """The Kubernetes objects of a SubmitRequest: [Service (several nodes only), Job]."""
    if not a.image:
        raise ConfigError("--cluster kubernetes needs --image IMAGE (a container image with trd-hpc installed)")
    argv, completions = _plan(a)
    name = dns_name(a.name or f"trd-{a.verb}-{Path(a.config).stem}")
    pods = a.nodes if a.nodes > 1 else completions
    indexed = pods > 1
    limits: dict = {"cpu": str(a.cpus_per_task * a.tasks_per_node)}
    if a.mem_gb is not None:
        limits["memory"] = f"{a.mem_gb:g}Gi"
    if a.gpus_per_node:
        limits["nvidia.com/gpu"] = a.gpus_per_node
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if indexed:  # $(JOB_COMPLETION_INDEX) in the arguments needs it defined in env
        env.append(
            {
                "name": INDEX_ENV,
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            }
        )
    if os.environ.get("TRD_HPC_PLUGINS"):  # a task of your own: every pod must find it too
        env.append({"name": "TRD_HPC_PLUGINS", "value": os.environ["TRD_HPC_PLUGINS"]})
    container = {
        "name": "trd-hpc",
        "image": a.image,
        "command": _command(a, argv, name),
        "workingDir": WORKDIR,
        "env": env,
        "resources": {"requests": dict(limits), "limits": dict(limits)},
    }
    pod: dict = {
        "restartPolicy": "Never",  # the Job makes a new pod; podFailurePolicy needs Never
        "terminationGracePeriodSeconds": a.signal_delay,
        "containers": [container],
    }
    if a.pvc:
        container["volumeMounts"] = [{"name": "work", "mountPath": WORKDIR}]
        pod["volumes"] = [{"name": "work", "persistentVolumeClaim": {"claimName": a.pvc}}]
    if a.nodes > 1:
        pod["subdomain"] = name  # pods NAME-K.NAME: the rendezvous address
    spec: dict = {
        "backoffLimit": a.max_timeouts,
        "activeDeadlineSeconds": a.time * 60 * (a.max_timeouts + 1),
        "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
        "template": {"metadata": {"labels": {"app.kubernetes.io/name": name}}, "spec": pod},
    }
    if indexed:
        spec.update(completionMode="Indexed", completions=pods, parallelism=pods)
    meta = {"name": name, "labels": {"app.kubernetes.io/name": name, "trd-hpc/verb": a.verb}}
    if a.namespace:
        meta["namespace"] = a.namespace
    objects: list[dict] = []
    if a.nodes > 1:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": dict(meta),
                "spec": {"clusterIP": "None", "selector": {"app.kubernetes.io/name": name}},
            }
        )
    objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec})
    return objects


class KubernetesLauncher:
    name = "kubernetes"

    def submit(self, a) -> int:
        from trd_hpc.fsio import atomic_write_text

        objects = manifests(a)
        job = objects[-1]["metadata"]["name"]
        path = Path(a.manifest or f"{job}.k8s.yaml")
        atomic_write_text(path, yaml.safe_dump_all(objects, sort_keys=False))
        ns = f" -n {a.namespace}" if a.namespace else ""
        print(f"wrote {path}: {' '.join(o['kind'] for o in objects)} {job}")
        print(f"  submit: kubectl{ns} apply -f {path}; follow: kubectl{ns} logs -f job/{job}")
        return 0
