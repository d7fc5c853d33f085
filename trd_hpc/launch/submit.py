"""``trd-hpc submit {train|generate|cv|tune|predict} CONFIG``: run a verb as a submitit job.

The job (SLURM, a local process, or in-process with ``--cluster debug``) runs the verb in
Python, in every task of the job: ``TrdJob.__call__``. For several tasks each task exports the
torch.distributed variables (``submitit.helpers.TorchDistributedEnvironment``) and the trainer
joins one DDP group.

Pre-emption and time limits (train and cv):

* submitit asks SLURM for ``--signal=USR2@<delay>`` and, in the job, installs its own SIGUSR2
  handler, which would call ``checkpoint()``, requeue and ``sys.exit`` *from inside the signal
  handler*, i.e. in the middle of a training step and without saving the model.
* So ``__call__`` keeps submitit's handler aside and installs trd's (``trd_hpc.train.signals``:
  SIGUSR2/SIGTERM only set a flag). On SIGUSR2 the trainer finishes the step, every rank agrees,
  rank 0 writes a checkpoint and ``RUN_DIR/PREEMPTED``, and ``experiment.train()`` returns None.
* ``__call__`` on rank 0 then calls submitit's handler itself: it tells a time-out from a
  pre-emption (and counts time-outs), calls ``checkpoint()`` -- which resubmits this same callable
  (``DelayedSubmission(self)``) -- runs ``scontrol requeue`` (``--cluster local``: exit code 144,
  which makes submitit's controller restart the tasks) and exits. The requeued job keeps its id,
  runs ``__call__`` again, and ``experiment.train(..., resume="auto")`` continues from the newest checkpoint.
  Other ranks return; SLURM ends them when the job is requeued.
* After SIGTERM (scancel, or pre-emption by the scheduler, which requeues by itself when its
  PreemptMode says so) the checkpoint is written the same way, but the job is not requeued by us.

``generate`` keeps submitit's handler (its shards are written atomically and a rerun keeps the
finished ones); ``tune`` too (rerunning a sweep restores it from Ray Tune's checkpoints).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trd_hpc import resources
from trd_hpc.errors import ConfigError, TrainingError
from trd_hpc.launch.verbs import VERBS as JOB_VERBS
from trd_hpc.launch.verbs import plan_jobs
from trd_hpc.rundir import PREEMPTED, RunDir

VERBS = tuple(JOB_VERBS)  # one table: trd_hpc.launch.verbs
CLUSTERS = ("slurm", "local", "debug", "kubernetes")


def _need_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("trd-hpc submit needs submitit: pip install 'trd-hpc[submitit]'") from None
    return submitit


# --------------------------------------------------------------------------- in the job
def _submitit_signal_handler():
    """submitit's SIGUSR2 handler (``SignalHandler.checkpoint_and_try_requeue``) when running in
    a submitit job, else None (``--cluster debug``, or called directly)."""
    h = signal.getsignal(signal.SIGUSR2)
    owner = getattr(h, "__self__", None)
    if owner is not None and type(owner).__module__.startswith("submitit."):
        return h
    return None


def _join_tasks() -> int:
    """This task's rank; with several tasks, export the torch.distributed variables."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except Exception:  # not in a submitit job
        return int(os.environ.get("RANK", 0))
    if env.num_tasks > 1:
        from submitit.helpers import TorchDistributedEnvironment

        from trd_hpc.train.plan import slurm_port

        # the port of every srun launch (trd_hpc.train.plan): same on every task, and not one
        # inherited from the submitting shell (submitit would keep that)
        os.environ["MASTER_PORT"] = str(slurm_port(env.raw_job_id))
        # CUDA_VISIBLE_DEVICES is left alone: the trainer picks GPU local_rank % visible GPUs
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return int(env.global_rank)


def _fold_outcome(run_dir: Path, timeout_s: float = 300.0) -> str:
    """'done' or 'preempted' for a fold whose training returned. Rank 0 writes metrics.json before
    the final barrier but PREEMPTED after the last collective, so another rank may have to wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        if RunDir(run_dir).has_metrics():
            return "done"
        if (run_dir / PREEMPTED).exists():
            return "preempted"
        if time.monotonic() > deadline:
            return "unknown"
        time.sleep(0.2)


class _TrdJob:
    """One trd-hpc verb, run in each task of a submitit job; requeued from its checkpoints.

    Use ``TrdJob`` (this class with ``submitit.helpers.Checkpointable`` as a base), made when first
    asked for: importing submitit costs ~60 ms, which every `trd-hpc` command would pay."""

    def __init__(
        self,
        verb: str,
        config: str,
        out: str,
        overrides: list[str] | None = None,
        cfg_data: dict | None = None,
        options: dict | None = None,
        cwd: str | None = None,
    ):
        if verb not in VERBS:
            raise ConfigError(f"unknown verb {verb!r}; one of {', '.join(VERBS)}")
        self.verb = verb
        self.config = config  # path of the config (train, generate, cv) or sweep spec (tune)
        self.out = out  # absolute: the run, cohort, cv or sweep directory
        self.overrides = list(overrides or [])
        self.cfg_data = cfg_data  # the config resolved at submission (a requeue runs the same one)
        self.options = dict(options or {})
        self.cwd = cwd  # relative paths in the config (data.cohort) are from here

    def __repr__(self) -> str:
        return f"TrdJob({self.verb} {self.config} -> {self.out})"

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before it requeues: run this same job again. The trainer has
        already written its checkpoint (see the module docstring) and resumes from it."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def __call__(self):
        if self.cwd and os.path.isdir(self.cwd):
            os.chdir(self.cwd)
        requeue = _submitit_signal_handler()  # before trd's handler replaces it
        if self.verb in ("train", "cv"):
            from trd_hpc.train import signals

            signals.clear()
            signals.install()
        rank = _join_tasks()
        return getattr(self, f"_run_{self.verb}")(rank, requeue)

    # ---------------------------------------------------------------- verbs
    def _cfg(self):
        from trd_hpc.config import load_config, validate_experiment

        if self.cfg_data is not None:
            return validate_experiment(self.cfg_data, self.config)
        return load_config(self.config, self.overrides)

    def _run_train(self, rank: int, requeue):
        from trd_hpc.experiment import train

        metrics = train(self._cfg(), self.out, resume="auto", evaluate=not self.options.get("no_eval"), progress=False)
        if rank == 0 and metrics is None:
            return self._preempted(rank, requeue)
        return metrics

    def _run_cv(self, rank: int, requeue):
        from trd_hpc.cv import aggregate, check_folds, fold_dir, run_cv
        from trd_hpc.train import signals

        cfg = self._cfg()
        out = Path(self.out)
        k_total = check_folds(cfg, self.options.get("folds"))
        fold = self.options.get("fold")
        todo = [fold] if fold is not None else list(range(k_total))
        for k in todo:  # one fold at a time, so that a pre-emption stops before the next fold
            if RunDir(fold_dir(out, k)).has_metrics():
                continue  # finished before a requeue
            run_cv(cfg, out, folds=k_total, fold=k, progress=False)
            if signals.requested() is not None or _fold_outcome(fold_dir(out, k)) == "preempted":
                return self._preempted(rank, requeue)
        if rank != 0:
            return None
        if all(RunDir(fold_dir(out, k)).has_metrics() for k in range(k_total)):
            return aggregate(out, k_total)  # the last fold to finish writes the summary
        return {"fold": fold, "summary": "written when every fold has finished"}

    def _run_generate(self, rank: int, requeue):
        from trd_hpc.data.generate import generate

        res = generate(
            self._cfg().cohort, Path(self.out), workers=int(self.options.get("workers") or 1), progress=False
        )
        return {
            "out": str(res.out),
            "made": res.made,
            "kept": res.kept,
            "remade": res.remade,
            "finalized": res.finalized,
            "seconds": res.seconds,
            "subjects_written": res.subjects_written,
        }

    def _run_predict(self, rank: int, requeue):
        from trd_hpc.predict import predict

        # the job's tasks are the ranks (RANK/WORLD_SIZE from SLURM): each predicts a slice, rank 0 merges
        res = predict(
            self.config, self.options["cohort"], out=self.out, split=self.options.get("split", "test"), progress=False
        )
        return {"out": str(res.out), "rows": res.rows, "merged": res.merged, "calibrator": res.calibrator}

    def _run_tune(self, rank: int, requeue):
        from trd_hpc.tune.sweep import run_sweep

        res = run_sweep(self.config, self.out, overrides=tuple(self.overrides), verbose=0, progress=False)
        if not res["finished"]:  # errored trials or an interruption: the job failed; resubmitting resumes
            raise TrainingError(f"the sweep {self.config} -> {self.out} did not finish; submit it again to resume")
        return res

    def _preempted(self, rank: int, requeue):
        """The trainer stopped at a step boundary after a signal and wrote its checkpoint."""
        from trd_hpc.train import signals

        sig = signals.requested()
        if rank != 0:
            return {"preempted": True, "rank": rank}
        if sig == "SIGTERM":
            print(
                "SIGTERM: checkpoint written; not requeuing (the scheduler requeues a pre-empted job "
                "itself, a cancelled one ends)",
                flush=True,
            )
            sys.exit(-1)  # like submitit: no result file, the job is not finished
        if requeue is not None:
            print(f"{sig or 'a signal on another rank'}: checkpoint written; requeueing through submitit", flush=True)
            requeue(signal.SIGUSR2, None)  # checkpoint() + requeue + exit on rank 0
        # not in a submitit job (debug executor): say so to the caller
        return {"preempted": True, "rank": rank, "signal": sig, "out": self.out}


def __getattr__(name: str):
    """``TrdJob``: _TrdJob + submitit's Checkpointable, defined on first use under this module's
    name, so that (cloud)pickle stores it by reference and the job process finds it again."""
    if name == "TrdJob":
        submitit = _need_submitit()
        cls = type(
            "TrdJob",
            (_TrdJob, submitit.helpers.Checkpointable),
            {"__module__": __name__, "__qualname__": "TrdJob", "__doc__": _TrdJob.__doc__},
        )
        globals()["TrdJob"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- submission
@dataclass
class SubmitRequest:
    """What ``trd-hpc submit`` was asked for (the CLI fills it; code may too)."""

    verb: str
    config: str
    out: str | None = None
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time: int = 240  # minutes per attempt
    partition: str | None = None
    account: str | None = None
    slurm: list[str] = field(default_factory=list)  # other sbatch options, KEY=VALUE
    signal_delay: int = 120
    max_timeouts: int = 10
    cluster: str | None = None
    logs: str | None = None
    name: str | None = None
    wait: bool = False
    wait_timeout: float | None = None
    no_eval: bool = False
    folds: int | None = None
    fold: int | None = None
    cohort: str | None = None  # predict: the subjects
    split: str = "test"  # predict
    image: str | None = None  # kubernetes: the container image holding trd-hpc
    namespace: str | None = None  # kubernetes
    pvc: str | None = None  # kubernetes: a PersistentVolumeClaim mounted at the job's working directory
    manifest: str | None = None  # kubernetes: the file written (default JOB_NAME.k8s.yaml)

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise ConfigError(f"unknown verb {self.verb!r}; one of {', '.join(VERBS)}")
        if self.cluster is not None and self.cluster not in CLUSTERS:
            raise ConfigError(f"unknown cluster {self.cluster!r}; one of {', '.join(CLUSTERS)}")


def make_jobs(a: SubmitRequest) -> tuple[list, str]:
    """The callables to submit (TrdJob: one, or one per fold for cv) and the job name; paths
    made absolute, since the job runs elsewhere (trd_hpc.launch.verbs.plan_jobs checks them)."""
    TrdJob = __getattr__("TrdJob")
    name = a.name or f"trd-{a.verb}-{Path(a.config).stem}"
    cwd = os.getcwd()
    if a.verb == "predict":
        from trd_hpc.bundle import load_bundle

        load_bundle(a.config)  # errors now, not in the queue
        if not a.cohort or not Path(a.cohort).is_dir():
            raise ConfigError(f"submit predict needs --cohort DIR (the subjects to predict); got {a.cohort!r}")
    jobs = []
    for p in plan_jobs(a):
        if p.verb == "predict":
            config, opts = str(Path(p.config).absolute()), {**p.options, "cohort": str(Path(a.cohort).absolute())}
        elif p.verb == "tune":
            config, opts = str(resources.sweep_path(p.config).absolute()), p.options
        else:
            config, opts = str(resources.config_path(p.config).absolute()), p.options
        jobs.append(TrdJob(p.verb, config, str(Path(p.out).absolute()), p.overrides, p.cfg_data, opts, cwd))
    return jobs, name


def make_executor(a: SubmitRequest, name: str):
    submitit = _need_submitit()
    logs = a.logs or "submitit-logs/%j"
    cluster = a.cluster
    if cluster is None:
        cluster = "slurm" if submitit.AutoExecutor.which() == "slurm" else "local"
    ex = submitit.AutoExecutor(folder=logs, cluster=cluster, slurm_max_num_timeout=a.max_timeouts)
    params = {
        "name": name,
        "timeout_min": a.time,
        "nodes": a.nodes,
        "tasks_per_node": a.tasks_per_node,
        "cpus_per_task": a.cpus_per_task,
    }
    if a.gpus_per_node is not None:
        params["gpus_per_node"] = a.gpus_per_node
    if a.mem_gb is not None:
        params["mem_gb"] = a.mem_gb
    extra = {}
    for kv in a.slurm:
        if "=" not in kv:
            raise ConfigError(f"--slurm {kv}: expected KEY=VALUE (an sbatch option without its dashes)")
        k, v = kv.split("=", 1)
        extra[k.lstrip("-")] = v
    params.update(
        slurm_signal_delay_s=a.signal_delay,
        # srun (22.05 on) does not inherit --cpus-per-task from the allocation
        slurm_srun_args=[f"--cpus-per-task={a.cpus_per_task}"],
    )
    if a.partition:
        params["slurm_partition"] = a.partition
    if a.account:
        params["slurm_account"] = a.account
    if extra:
        params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex, cluster


def _task0(job):
    return job.task(0) if getattr(job, "num_tasks", 1) > 1 else job


class _Tail:
    """Print what is appended to a file (the job's stdout), from where it was at the start."""

    def __init__(self, path: Path, prefix: str = ""):
        self.path, self.prefix, self.pos = Path(path), prefix, 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        if end:
            self.pos += end
            for line in data[:end].decode(errors="replace").splitlines():
                print(f"{self.prefix}{line}", flush=True)


def wait_jobs(jobs, timeout_s: float | None = None, stream: bool = True, poll_s: float = 1.0) -> bool:
    """Wait (bounded by ``timeout_s``) until every job is done, printing their task-0 stdout.
    Returns False on time-out. The cluster is asked directly every 10 s, not only every minute."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    tails = [_Tail(_task0(j).paths.stdout, f"[{j.job_id}] " if len(jobs) > 1 else "") for j in jobs] if stream else []
    last_force = time.monotonic()
    while True:
        force = time.monotonic() - last_force >= 10
        if force:
            last_force = time.monotonic()
        done = all(j.done(force_check=force) for j in jobs)
        for t in tails:
            t.poll()
        if done:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def _print_result(verb: str, res) -> None:
    if not isinstance(res, dict):
        print(f"result: {res}")
        return
    if res.get("preempted"):
        print(f"pre-empted (not requeued): resubmit the same command to continue from {res.get('out')}")
    elif verb == "train":
        keys = [
            k
            for k in ("test.auc", "test.ap", "test.accuracy", "test.severity_mae", "best_epoch", "world_size")
            if k in res
        ]
        print(
            "final: " + "  ".join(f"{k} {res[k]:.4g}" if isinstance(res[k], float) else f"{k} {res[k]}" for k in keys)
        )
    elif verb == "cv" and "folds" in res:
        from trd_hpc.cv import format_summary

        print(format_summary(res))
    else:
        print(
            "result: "
            + ", ".join(f"{k}={v}" for k, v in res.items() if not isinstance(v, (list, dict)) or len(str(v)) < 80)
        )


class SubmititLauncher:
    """SLURM, local background processes or this process, through submitit (``submit_jobs``)."""

    name = "submitit"

    def submit(self, a: SubmitRequest) -> int:
        return submit_jobs(a)


def launcher_for(cluster: str | None):
    """The Launcher of ``--cluster`` (each has ``name`` and ``submit(request) -> exit code``)."""
    if cluster == "kubernetes":
        from trd_hpc.launch.kubernetes import KubernetesLauncher

        return KubernetesLauncher()
    return SubmititLauncher()


def submit(a: SubmitRequest) -> int:
    """``trd-hpc submit``: the request handed to its cluster's launcher; the exit code."""
    return launcher_for(a.cluster).submit(a)


def submit_jobs(a: SubmitRequest) -> int:
    """Submit the job(s), print their ids and logs; with ``a.wait`` follow them and print the
    result.  The exit code of ``trd-hpc submit``."""
    submitit = _need_submitit()
    jobs_to_run, name = make_jobs(a)
    ex, cluster = make_executor(a, name)
    if cluster == "debug":
        a.wait = True  # the debug executor runs the job in this process, when its result is asked for
    if len(jobs_to_run) > 1:
        with ex.batch():
            handles = [ex.submit(j) for j in jobs_to_run]
    else:
        handles = [ex.submit(jobs_to_run[0])]
    out = jobs_to_run[0].out
    for h, j in zip(handles, jobs_to_run):
        t0 = _task0(h)
        print(
            f"submitted {cluster} job {h.job_id}: {j.verb} {a.config} -> {j.out}"
            + (f" (fold {j.options['fold']})" if j.verb == "cv" else ""),
            flush=True,
        )
        print(f"  logs: {t0.paths.stdout}  {t0.paths.stderr}", flush=True)
    if cluster == "slurm":
        ids = " ".join(sorted({str(h.job_id).split("_")[0] for h in handles}))
        print(f"  follow: squeue -j {ids}; sacct -j {ids}; cancel: scancel {ids}", flush=True)
    if not a.wait:
        return 0
    try:
        if cluster != "debug" and not wait_jobs(handles, a.wait_timeout):
            print(f"still running after {a.wait_timeout:.0f} s: stopped waiting (the job goes on)", file=sys.stderr)
            return 124
    except KeyboardInterrupt:
        print("\nstopped waiting (the job goes on)", file=sys.stderr)
        return 130
    rc = 0
    results = []
    for h in handles:
        try:
            results.append(_task0(h).result())
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
            rc = 1
            print(f"job {h.job_id} did not finish: {str(e)[-3000:]}", file=sys.stderr)
            print(f"  logs: {_task0(h).paths.stdout}  {_task0(h).paths.stderr}", file=sys.stderr)
    if rc:
        return rc
    verb = jobs_to_run[0].verb
    if verb == "cv" and len(results) > 1:
        from trd_hpc.cv import SUMMARY, run_cv

        summary_file = Path(out) / SUMMARY
        if summary_file.exists():
            import json

            _print_result("cv", json.loads(summary_file.read_text()))
            print(f"summary: {summary_file}")
        else:  # the folds raced: write it here
            from trd_hpc.config import validate_experiment

            cfg = validate_experiment(jobs_to_run[0].cfg_data, jobs_to_run[0].config)
            _print_result(
                "cv", run_cv(cfg, Path(out), folds=jobs_to_run[0].options["folds"], only_aggregate=True, progress=False)
            )
            print(f"summary: {summary_file}")
        return 0
    for res in results:
        _print_result(verb, res)
        if isinstance(res, dict) and res.get("preempted"):
            rc = 3
    if verb in ("train", "generate", "tune"):
        print(f"output: {out}")
    return rc
