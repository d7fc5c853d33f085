"""``trd-hpc tune SPEC --out DIR``: a Ray Tune sweep of the shared trainer.

One trial is one run of ``trd_hpc.experiment.train_run`` in ``DIR/sweep/<trial>/run``
(``resume="auto"``), reporting once per epoch (``trd_hpc.tune.trial``).  With ASHA a trial is
stopped right after a report; its run directory keeps every finished epoch.  Trials are drawn by
Ray's random/grid generator or by Optuna's TPE (``search:``, ``trd_hpc.tune.search``).

Layout of DIR:
  sweep/                 Ray Tune's experiment (restored by the same command)
    trial_<id>/trial.json  the trial's id and sampled hyper-parameters
    trial_<id>/run/        the trainer's run dir (config.yaml, metrics.jsonl, checkpoints/)
    trial_<id>/tracking/   the driver's W&B / MLflow logs of the trial (trd_hpc.tune.tracking)
  sweep_spec.json        the checked spec and resolved base config (a rerun must match)
  sweep_state.json       finished true/false, trial counts, wall seconds over all invocations
  rungs.json             ASHA's rung records and decisions (trd_hpc.tune.rungs)
  best.json              the best trial: metric value, epoch, params, run dir; sweep cost
  best_config.yaml       the best trial's full config (``trd-hpc train best_config.yaml --out X``)

Resumption: a restored trial resumes the trainer from its newest checkpoint (never repeating an
epoch) and first reports the epochs the trainer finished but Tune had not received.  ASHA's rung
records come back with the experiment (Ray's own restore loses them), so the requeued sweep
stops the trials an uninterrupted one stops.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trd_hpc import faults
from trd_hpc.config import ConfigError, validate_experiment
from trd_hpc.fsio import atomic_write_text
from trd_hpc.train.plan import available_cpus
from trd_hpc.tune.rungs import recorded_asha
from trd_hpc.tune.search import numbered_trial_dirname, search_algorithm, study_counts
from trd_hpc.tune.spec import Sweep, dumps, load_spec
from trd_hpc.tune.summary import BEST_CONFIG, BEST_FILE, EXPERIMENT, format_result, summarize
from trd_hpc.tune.tracking import tracking_callbacks
from trd_hpc.tune.trial import read_json as _read_json
from trd_hpc.tune.trial import trial_main

# what the CLI and the launchers take from here
__all__ = ["BEST_CONFIG", "BEST_FILE", "format_result", "prepare_cohort", "run_sweep", "start_ray", "unfinished_reason"]

STATE_FILE = "sweep_state.json"
SPEC_FILE = "sweep_spec.json"
OBJECT_STORE_BYTES = 80 * 1024 * 1024
RESOURCE_WAIT_S = 120  # on an existing cluster, how long to wait for nodes with a trial's resources


# --------------------------------------------------------------------------- Ray
def use_normal_priority_for_trials() -> None:
    """Ray starts its workers at niceness 15, so on a node with anything else running
    (another job's processes, data loading, a busy login node) the trials, which are the
    whole point of a sweep, get a few percent of a core.  0 unless the user set it; read
    by the raylet this process starts."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def start_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int = OBJECT_STORE_BYTES,
    log_to_driver: bool = True,
) -> bool:
    """Connect to ``address`` ('auto': the running cluster; default: $RAY_ADDRESS) or start
    a small local instance; returns True when this call called ``ray.init`` (the caller
    shuts it down).  Reuses a Ray that this process already initialised."""
    import ray

    if ray.is_initialized():
        return False
    use_normal_priority_for_trials()
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kw)
    else:
        # address="local": a new instance, never the `ray start` cluster that a bare ray.init()
        # would join (/tmp/ray/ray_current_cluster, possibly stale or another job's)
        ray.init(address="local", num_cpus=num_cpus or available_cpus(), object_store_memory=object_store_memory, **kw)
    return True


def _state_callback_class():
    from ray.tune import Callback

    class StateCallback(Callback):
        """Keeps sweep_state.json's wall seconds current while the sweep runs (a killed
        driver still leaves its time there).  Pickled with the Tuner: reads the time of
        earlier invocations from the file at each ``fit``."""

        def __init__(self, out_dir: str):
            self.out_dir = out_dir
            self._t0 = None
            self._base = 0.0
            self._last = 0.0

        def setup(self, **info):
            self._t0 = time.perf_counter()
            st = _read_json(Path(self.out_dir) / STATE_FILE) or {}
            self._base = float(st.get("wall_seconds", 0.0))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            faults.point("tune-result")  # TRD_FAULT=tune-result:K: the driver dies at its K-th result
            now = time.perf_counter()
            if self._t0 is None or now - self._last < 1.0:
                return
            self._last = now
            st = _read_json(Path(self.out_dir) / STATE_FILE) or {}
            st["wall_seconds"] = self._base + now - self._t0
            _write_state(Path(self.out_dir), st)

    return StateCallback


def _StateCallback(out_dir: str):
    return _state_callback_class()(out_dir)


# --------------------------------------------------------------------------- the sweep
def _write_state(out_dir: Path, state: dict) -> None:
    atomic_write_text(out_dir / STATE_FILE, dumps(state) + "\n")


def prepare_cohort(sweep: Sweep, progress: bool = True, generate: bool = False) -> str:
    """The absolute cohort directory shared by every trial; generated now when missing only if
    the base config says data.generate (`tune --generate`) or ``generate`` (bench tune, whose
    cohort is its own)."""
    from trd_hpc.cohort import ensure_cohort
    from trd_hpc.train import distributed as D

    cohort = str(Path(sweep.base_data.get("data", {}).get("cohort", "data/cohort")).expanduser().absolute())
    cfg = validate_experiment(sweep.trial_data({}, cohort=cohort), "base")
    if generate and not cfg.data.generate:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"generate": True})})
    ensure_cohort(cfg, D.DistInfo(), progress)
    return cohort


def _scheduler(spec, out_dir: Path) -> tuple[Any, list]:
    """The Tuner's scheduler and the callbacks it needs: ASHA keeps its rungs with the experiment."""
    from ray.tune.schedulers import FIFOScheduler

    if spec.scheduler != "asha":
        return FIFOScheduler(), []
    sched, records = recorded_asha(
        out_dir,
        time_attr="epoch",
        max_t=spec.max_t,
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
        brackets=1,
    )
    return sched, [records]


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _make_tuner(sweep: Sweep, out_dir: Path, cohort: str, restoring: bool, verbose: int):
    """The sweep's Tuner: restored from ``out_dir`` when ``restoring``, else a new one."""
    from ray import tune

    spec, exp_dir = sweep.spec, out_dir / EXPERIMENT
    ctx = {
        "exp_dir": str(exp_dir),
        "cohort": cohort,
        "threads": max(1, int(spec.resources_per_trial.get("cpu", 1))),
        "sweep": sweep,
    }
    resources = {k: v for k, v in spec.resources_per_trial.items()}
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), resources)
    if restoring:  # the scheduler, search state and callbacks come back from the experiment
        print(f"resuming the sweep in {exp_dir}", flush=True)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    sched, sched_callbacks = _scheduler(spec, out_dir)
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.scheduler_metric,
            mode=spec.mode,
            scheduler=sched,
            num_samples=spec.num_samples,
            search_alg=search_algorithm(sweep, out_dir),
            reuse_actors=True,
            # Ray's ids of the random generator come back with its state; Optuna's do not
            trial_dirname_creator=numbered_trial_dirname if spec.model_based else _trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out_dir),
            stop={"epoch": spec.max_t},
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=0),
            # the rung records first: Ray restores callback states by their place in this list
            callbacks=sched_callbacks
            + [_StateCallback(str(out_dir))]
            + tracking_callbacks(sweep, out_dir, EXPERIMENT, cohort, ctx["threads"]),
            verbose=verbose,
        ),
    )


def _fit(sweep: Sweep, out_dir: Path, cohort: str, restoring: bool, state: dict, address, min_nodes: int, verbose: int):
    """This invocation's Tuner.fit: ``(trials, terminated, errored)``; adds its wall seconds to ``state``."""
    spec = sweep.spec
    t0 = time.perf_counter()
    started = start_ray(address, log_to_driver=verbose > 0)
    try:
        import ray

        def missing() -> dict:
            have = ray.cluster_resources()
            return {
                k: max(have.get(k, 0), have.get(k.upper(), 0))
                for k, v in spec.resources_per_trial.items()
                if max(have.get(k, 0), have.get(k.upper(), 0)) < v
            }

        def alive() -> int:
            return sum(1 for n in ray.nodes() if n.get("Alive"))

        short, nodes = missing(), alive()
        joining = bool(address or os.environ.get("RAY_ADDRESS"))  # an existing cluster: nodes may still come
        deadline = time.monotonic() + (RESOURCE_WAIT_S if joining else 0)
        # a cluster whose workers are still joining: trials started now would all land on the head
        while (short or nodes < min_nodes) and time.monotonic() < deadline:
            time.sleep(2)
            short, nodes = missing(), alive()
        if short:
            raise ConfigError(
                f"resources_per_trial {spec.resources_per_trial} exceeds what the Ray cluster has ({short}); lower it"
            )
        if nodes < min_nodes:
            raise ConfigError(
                f"--min-nodes {min_nodes}: only {nodes} Ray node(s) joined within {RESOURCE_WAIT_S} s "
                f"(see the workers' logs, or lower --min-nodes)"
            )
        grid = _make_tuner(sweep, out_dir, cohort, restoring, verbose).fit()
        return len(grid), grid.num_terminated, grid.num_errors
    finally:
        state["wall_seconds"] = float(state.get("wall_seconds", 0.0)) + time.perf_counter() - t0
        _write_state(out_dir, state)
        if started:
            import ray

            ray.shutdown()


def run_sweep(
    spec_path,
    out_dir,
    base=None,
    address=None,
    scheduler=None,
    overrides=(),
    resume=True,
    *,
    spec_updates: dict | None = None,
    verbose: int = 1,
    progress: bool = True,
    min_nodes: int = 1,
) -> dict:
    """Run (or continue) the sweep of ``spec_path`` in ``out_dir``; returns best.json's content.

    ``base`` replaces the spec's base config, ``scheduler`` its scheduler (asha|fifo),
    ``overrides`` are dotted key=value pairs for the base config, ``spec_updates`` replace
    spec fields (e.g. ``{"max_t": 4, "num_samples": 8}``). On an existing cluster the first
    trial waits (at most RESOURCE_WAIT_S) until ``min_nodes`` Ray nodes have joined.  With ``resume`` an existing
    sweep in ``out_dir`` is restored (its unfinished and errored trials continue from their
    checkpoints); without it an existing sweep is an error."""
    sweep = (
        spec_path
        if isinstance(spec_path, Sweep)
        else load_spec(
            spec_path, base=base, overrides=tuple(overrides), updates={**(spec_updates or {}), "scheduler": scheduler}
        )
    )
    spec = sweep.spec
    out_dir = Path(out_dir).expanduser().absolute()
    exp_dir = out_dir / EXPERIMENT
    cohort = prepare_cohort(sweep, progress=progress)
    fingerprint = sweep.fingerprint(cohort)
    fp_file = out_dir / SPEC_FILE

    # num_to_keep forces an experiment snapshot after that many checkpoints of a trial: wanted
    # here (a restored sweep loses less), so no warning about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    restoring = tune.Tuner.can_restore(str(exp_dir))
    if restoring or fp_file.exists():
        if not resume:
            raise ConfigError(
                f"{out_dir} already holds a sweep; rerun without --no-resume to continue it, or use another --out"
            )
        old = _read_json(fp_file)
        if old is not None and old != json.loads(dumps(fingerprint)):
            raise ConfigError(
                f"{out_dir} holds a sweep of another spec or base config ({fp_file} differs); "
                f"use another --out, or rerun with the same spec, base and overrides"
            )
    state = _read_json(out_dir / STATE_FILE) or {"wall_seconds": 0.0, "invocations": 0}
    if resume and state.get("finished") and fp_file.exists():
        return summarize(out_dir, sweep, cohort, state, study_counts(sweep, out_dir))  # nothing left to run
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fp_file, dumps(fingerprint) + "\n")
    state.update(
        {
            "finished": False,
            "experiment": str(exp_dir),
            "spec": sweep.source,
            "scheduler": spec.scheduler,
            "trials_expected": spec.num_trials,
            "invocations": int(state.get("invocations", 0)) + 1,
        }
    )
    _write_state(out_dir, state)

    n, done, errors = _fit(sweep, out_dir, cohort, restoring, state, address, min_nodes, verbose)
    state.update(
        {
            "finished": n == spec.num_trials and done == n and errors == 0,
            "trials": n,
            "terminated": done,
            "errored": errors,
        }
    )
    _write_state(out_dir, state)
    return summarize(out_dir, sweep, cohort, state, study_counts(sweep, out_dir))


def unfinished_reason(out_dir: Path) -> tuple[str, int]:
    """Why a sweep that returned unfinished stopped, and the exit code to give: 1 when trials
    ended with an error, 130 when it was interrupted."""
    state = _read_json(Path(out_dir) / STATE_FILE) or {}
    if state.get("errored"):
        return (
            f"{state['errored']} trial(s) ended with an error (see {Path(out_dir) / EXPERIMENT}); "
            f"rerun the same command to retry them"
        ), 1
    return "sweep interrupted: rerun the same command to resume it", 130
