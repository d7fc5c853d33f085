"""``trd-hpc submit VERB CONFIG``: a verb as a submitit job (trd_hpc.launch.submit) or a
Kubernetes Job manifest (trd_hpc.launch.kubernetes)."""

from __future__ import annotations

import dataclasses

from trd_hpc.cli.common import add_generate, add_overrides, verb
from trd_hpc.launch.submit import CLUSTERS, VERBS, SubmitRequest


def _submit(a) -> int:
    from trd_hpc.launch.submit import submit

    if a.generate:  # train / cv / tune: make a missing cohort (data.generate)
        a.overrides = [*(a.overrides or []), "data.generate=true"]
    fields = {f.name for f in dataclasses.fields(SubmitRequest)}
    return submit(SubmitRequest(**{k: v for k, v in vars(a).items() if k in fields}))


def add_parsers(sub) -> None:
    p = verb(
        sub,
        "submit",
        _submit,
        help="run train, generate, cv, tune or predict as a SLURM job (or a local one) through submitit",
        description="Submit `trd-hpc VERB CONFIG` as a submitit job: SLURM (default when srun is on PATH), a "
        "local background process (--cluster local) or in this process (--cluster debug). Prints the job id "
        "and log files; with --wait follows the log and prints the result. train and cv are checkpointed and "
        "requeued on pre-emption or time-out (SIGUSR2) and resume from their newest checkpoint.",
        epilog="Example:\n  trd-hpc submit train configs/emt.yaml --out runs/emt --nodes 2 --tasks-per-node 4 "
        "--gpus-per-node 4 --cpus-per-task 8 --time 720 --partition gpu\n"
        "  trd-hpc submit cv configs/cnn3d.yaml --out runs/cv --cpus-per-task 4   # one array task per fold",
    )
    p.add_argument("verb", choices=VERBS, help="what to run")
    p.add_argument(
        "config", help="experiment YAML (train, generate, cv), sweep spec (tune), or run dir / bundle (predict)"
    )
    p.add_argument(
        "--out",
        help="run / cohort / cv / sweep directory (default: runs/<verb>-<config>-<time>; "
        "generate: the config's data.cohort)",
    )
    r = p.add_argument_group("resources (per job; one task per GPU or per CPU slot)")
    r.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    r.add_argument("--tasks-per-node", type=int, default=1, help="DDP processes per node (train, cv)")
    r.add_argument("--gpus-per-node", type=int, default=None, help="default: none requested")
    r.add_argument("--cpus-per-task", type=int, default=1, help="also the torch threads per task (default 1)")
    r.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the cluster's)")
    r.add_argument("--time", type=int, default=240, metavar="MINUTES", help="time limit per attempt (default 240)")
    r.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    r.add_argument("--account", default=None, help="SLURM account to charge (default: yours)")
    r.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --slurm qos=high --slurm constraint=a100 (repeatable)",
    )
    r.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        metavar="S",
        help="SIGUSR2 this many seconds before the time limit (default 120)",
    )
    r.add_argument(
        "--max-timeouts",
        type=int,
        default=10,
        help="requeues after reaching the time limit before giving up (default 10; pre-emptions are not counted)",
    )
    j = p.add_argument_group("submission")
    j.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default=None,
        help="slurm, local (background processes), debug (in this process) or kubernetes (writes a Job "
        "manifest for kubectl apply); default: slurm if srun is found",
    )
    k = p.add_argument_group("kubernetes (--cluster kubernetes)")
    k.add_argument("--image", default=None, help="container image with trd-hpc installed (required)")
    k.add_argument("--namespace", default=None, help="namespace of the Job (default: kubectl's)")
    k.add_argument("--pvc", default=None, help="PersistentVolumeClaim mounted as the pods' working directory")
    k.add_argument("--manifest", default=None, help="file to write (default: JOB_NAME.k8s.yaml)")
    j.add_argument("--logs", default=None, help="submitit folder: job pickles and logs (default: submitit-logs/%%j)")
    j.add_argument("--name", default=None, help="job name (default trd-VERB-CONFIG)")
    j.add_argument("--wait", action="store_true", help="follow the job's log until it ends and print its result")
    j.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop waiting after S seconds (the job keeps running); Ctrl-C also stops waiting",
    )
    v = p.add_argument_group("verb options")
    v.add_argument("--no-eval", action="store_true", help="train: skip calibration, baselines, figures, report")
    v.add_argument("--folds", type=int, default=None, help="cv: number of folds (default: cohort.split.folds)")
    v.add_argument("--fold", type=int, default=None, help="cv: only this fold (default: one array task per fold)")
    v.add_argument("--cohort", default=None, help="predict: the cohort directory whose subjects to predict")
    v.add_argument("--split", default="test", help="predict: test (default) | val | train | all | fold:K")
    add_generate(p)
    add_overrides(p)
