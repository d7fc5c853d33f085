"""``trd-hpc tune SPEC --out DIR``: a Ray Tune sweep of the shared trainer.

One trial is one run of ``trd_hpc.experiment.train_run`` in ``DIR/sweep/<trial>/run``
(``resume="auto"``), reporting once per epoch.  With ASHA a trial is stopped
right after a report; its run directory keeps every finished epoch.

Layout of DIR:
  sweep/                 Ray Tune's experiment (restored by the same command)
    trial_<id>/trial.json  the trial's id and sampled hyper-parameters
    trial_<id>/run/        the trainer's run dir (config.yaml, metrics.jsonl, checkpoints/)
    trial_<id>/tracking/   the driver's W&B / MLflow logs of the trial (trd_hpc.tune.tracking)
  sweep_spec.json        the checked spec and resolved base config (a rerun must match)
  sweep_state.json       finished true/false, trial counts, wall seconds over all invocations
  best.json              the best trial: metric value, epoch, params, run dir; sweep cost
  best_config.yaml       the best trial's full config (``trd-hpc train best_config.yaml --out X``)

Resumption: the Tune checkpoint of a report is a marker holding the epoch just
reported; the trainer's own checkpoints live in the run dir.  A restored trial
resumes the trainer from its newest checkpoint (never repeating an epoch) and first
reports the epochs the trainer finished but Tune had not received (a kill between the
trainer's checkpoint and the report).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trd_hpc.config import ConfigError, to_yaml, validate_experiment
from trd_hpc.fsio import atomic_write_text
from trd_hpc.rundir import RunDir
from trd_hpc.train.plan import available_cpus
from trd_hpc.tune.spec import SCORE_KEY, Sweep, dumps, load_spec, score
from trd_hpc.tune.tracking import tracking_callbacks

EXPERIMENT = "sweep"
STATE_FILE = "sweep_state.json"
SPEC_FILE = "sweep_spec.json"
BEST_FILE = "best.json"
BEST_CONFIG = "best_config.yaml"
TRIAL_FILE = "trial.json"
FAILED_FILE = "FAILED"
PROGRESS_FILE = "progress.json"
OBJECT_STORE_BYTES = 80 * 1024 * 1024
RESOURCE_WAIT_S = 120  # on an existing cluster, how long to wait for nodes with a trial's resources


# --------------------------------------------------------------------------- the trial
def _history(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).history()


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def recorded_params(trial_dir: Path, params: dict) -> dict:
    """The parameters this trial's run was started with, when it was started already.

    A driver killed between Ray's snapshots can come back with the search algorithm's state
    ahead of its trial list: the restored trial then gets the next sample, not the one its run
    directory was trained with, and resuming that run would fail on the changed config every
    time. The run on disk wins: it goes on with its own parameters, and trial.json keeps saying
    which (the sweep's summaries read them from there)."""
    info = _read_json(trial_dir / TRIAL_FILE)
    old = (info or {}).get("params")
    if old is None or old == params or not (trial_dir / "run" / "config.yaml").exists():
        return params
    print(
        f"trial {trial_dir.name}: restored with {params}, but its run was started with {old}; continuing that run",
        file=sys.stderr,
        flush=True,
    )
    return dict(old)


def trial_main(config: dict, ctx: dict) -> None:
    """The Tune function trainable (``config``: the sampled dotted keys)."""
    from ray import tune

    from trd_hpc.experiment import train_run
    from trd_hpc.train.trainer import TrainingError

    tc = tune.get_context()
    trial_dir = Path(ctx["exp_dir"]) / Path(tc.get_trial_dir()).name
    run_dir = trial_dir / "run"
    trial_dir.mkdir(parents=True, exist_ok=True)
    params = recorded_params(trial_dir, dict(config))
    import ray

    atomic_write_text(
        trial_dir / TRIAL_FILE,
        dumps(
            {
                "trial_id": tc.get_trial_id(),
                "trial_name": tc.get_trial_name(),
                "params": params,
                "run_dir": str(run_dir),
                # where it ran (last, if restored): on a multi-node cluster, which node
                "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(),
            }
        ),
    )
    sweep: Sweep = ctx["sweep"]
    cfg = validate_experiment(
        sweep.trial_data(params, cohort=ctx["cohort"], threads=ctx["threads"]), f"trial {tc.get_trial_id()}"
    )
    spec = sweep.spec
    metric = spec.metric
    needed = [metric] + ([spec.tie_breaker.metric] if spec.tie_breaker else [])

    reported = {"epoch": 0}
    ck = tune.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            reported["epoch"] = int(json.loads((Path(d) / PROGRESS_FILE).read_text())["epoch"])

    def report(row: dict) -> None:
        for m in needed:
            if m not in row:
                raise ConfigError(
                    f"metric '{m}' is not reported by the {cfg.task} trainer; it reports: "
                    f"{', '.join(sorted(k for k in row if k.startswith(('val.', 'train.'))))}"
                )
        marker = Path(tempfile.mkdtemp(prefix="trd-tune-"))
        try:
            atomic_write_text(marker / PROGRESS_FILE, json.dumps({"epoch": int(row["epoch"]), "run_dir": str(run_dir)}))
            reported["epoch"] = int(row["epoch"])
            metrics = {**_scalars(row), "epoch": int(row["epoch"])}
            if spec.tie_breaker:
                metrics[SCORE_KEY] = score(row, metric, spec.mode, spec.tie_breaker)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(marker)))
        finally:  # also when ASHA stops the trial inside report (SystemExit)
            shutil.rmtree(marker, ignore_errors=True)

    def on_epoch(trainer, row: dict) -> None:
        for r in list(trainer.state.history):  # epochs finished before a restart come first
            if r["epoch"] > reported["epoch"]:
                report(r)

    try:
        train_run(cfg, run_dir, resume="auto", progress=False, on_epoch=on_epoch)
    except TrainingError as e:  # e.g. a NaN loss at a high learning rate: the trial ends, the sweep goes on
        atomic_write_text(trial_dir / FAILED_FILE, f"{e}\n")
        print(f"trial {tc.get_trial_id()} failed: {e}", file=sys.stderr, flush=True)
        return
    for r in _history(run_dir):  # a restored trial whose trainer had already finished
        if r["epoch"] > reported["epoch"]:
            report(r)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


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


# --------------------------------------------------------------------------- summary
def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def trial_summaries(out_dir: Path, sweep: Sweep) -> list[dict]:
    """Per trial (from the run dirs, the record of what was trained): params, epochs, best value."""
    metric, mode, max_t = sweep.spec.metric, sweep.spec.mode, sweep.spec.max_t
    out = []
    for tf in sorted((out_dir / EXPERIMENT).glob(f"*/{TRIAL_FILE}")):
        info = _read_json(tf)
        if info is None:
            continue
        run_dir = Path(info["run_dir"])
        rows = _history(run_dir)
        # the best epoch by the scheduler's ranking (the metric; the tie-breaker between equal values)
        scored = [(score(r, metric, mode, sweep.spec.tie_breaker), r[metric], r["epoch"]) for r in rows]
        scored = [t for t in scored if t[0] is not None]
        best = (max if mode == "max" else min)(scored, key=lambda t: t[0]) if scored else (None, None, None)
        failed = (tf.parent / FAILED_FILE).exists()
        out.append(
            {
                "trial_id": info["trial_id"],
                "params": info["params"],
                "run_dir": str(run_dir),
                "epochs": len(rows),
                "epoch_list": [r["epoch"] for r in rows],
                "best_score": best[0],
                "best_value": best[1],
                "best_epoch": best[2],
                "failed": failed,
                "stopped_early": (not failed) and 0 < len(rows) < max_t,
            }
        )
    return out


def summarize(out_dir: Path, sweep: Sweep, cohort: str, state: dict) -> dict:
    trials = trial_summaries(out_dir, sweep)
    spec = sweep.spec
    scored = [t for t in trials if t["best_score"] is not None]
    best = None
    if scored:
        key = (lambda t: t["best_score"]) if spec.mode == "max" else (lambda t: -t["best_score"])
        best = max(scored, key=key)  # the first of equal values (trials sorted by id)
    result = {
        "metric": spec.metric,
        "mode": spec.mode,
        "scheduler": spec.scheduler,
        "max_t": spec.max_t,
        "tie_breaker": spec.tie_breaker.model_dump() if spec.tie_breaker else None,
        "value": best["best_value"] if best else None,
        "trial_id": best["trial_id"] if best else None,
        "best_epoch": best["best_epoch"] if best else None,
        "params": best["params"] if best else None,
        "run_dir": best["run_dir"] if best else None,
        "trial_epochs": sum(t["epochs"] for t in trials),
        "num_trials": len(trials),
        # trials that ran fewer than max_t epochs: stopped by ASHA (or the trainer's early stopping)
        # once the sweep has finished, possibly just interrupted before
        "stopped_early": sum(t["stopped_early"] for t in trials) if state.get("finished") else None,
        "short_of_max_t": sum(t["stopped_early"] for t in trials),
        "failed": sum(t["failed"] for t in trials),
        "wall_seconds": state.get("wall_seconds", 0.0),
        "finished": bool(state.get("finished")),
        "spec": sweep.source,
        "base": str(sweep.base_path),
        "cohort": cohort,
        "trials": [
            {k: t[k] for k in ("trial_id", "params", "epochs", "best_value", "best_epoch", "failed")} for t in trials
        ],
    }
    atomic_write_text(out_dir / BEST_FILE, dumps(result) + "\n")
    if best is not None:
        data = sweep.trial_data(best["params"], cohort=cohort, tracking_off=False)
        cfg = validate_experiment(data, "best trial")
        header = (
            f"# Best trial {best['trial_id']} of the sweep {sweep.source} ({spec.scheduler}, {len(trials)} trials):\n"
            f"# {spec.metric} = {best['best_value']:.6g} at epoch {best['best_epoch']}; run: {best['run_dir']}\n"
            f"# Train it again: trd-hpc train {out_dir / BEST_CONFIG} --out RUN_DIR\n"
        )
        atomic_write_text(out_dir / BEST_CONFIG, header + to_yaml(cfg))
    return result


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


def _make_tuner(sweep: Sweep, out_dir: Path, cohort: str, restoring: bool, verbose: int):
    """The sweep's Tuner: restored from ``out_dir`` when ``restoring``, else a new one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    spec, exp_dir = sweep.spec, out_dir / EXPERIMENT
    ctx = {
        "exp_dir": str(exp_dir),
        "cohort": cohort,
        "threads": max(1, int(spec.resources_per_trial.get("cpu", 1))),
        "sweep": sweep,
    }
    resources = {k: v for k, v in spec.resources_per_trial.items()}
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), resources)
    if restoring:
        print(f"resuming the sweep in {exp_dir}", flush=True)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    if spec.scheduler == "asha":
        sched = ASHAScheduler(
            time_attr="epoch",
            max_t=spec.max_t,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            brackets=1,
        )
    else:
        sched = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.scheduler_metric,
            mode=spec.mode,
            scheduler=sched,
            num_samples=spec.num_samples,
            search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent),
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out_dir),
            stop={"epoch": spec.max_t},
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[_StateCallback(str(out_dir))]
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
        return summarize(out_dir, sweep, cohort, state)  # nothing left to run
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
    return summarize(out_dir, sweep, cohort, state)


def format_result(res: dict) -> str:
    v = res.get("value")
    lines = [
        f"best {res['metric']} = {v:.4f} (trial {res['trial_id']}, epoch {res['best_epoch']})"
        if v is not None
        else f"no trial reported {res['metric']} yet",
        f"params: {res.get('params')}",
        f"{res['num_trials']} trials, {res['trial_epochs']} trial-epochs, "
        + (
            f"{res['stopped_early']} stopped early, "
            if res["finished"]
            else f"{res['short_of_max_t']} not at max_t yet, "
        )
        + f"{res['failed']} failed, {res['wall_seconds']:.1f} s ({res['scheduler']}, max_t {res['max_t']})",
    ]
    return "\n".join(lines)


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
