"""One trial of a sweep: a run of ``trd_hpc.experiment.train_run`` in ``DIR/sweep/<trial>/run``.

The trial reports once per epoch; with ASHA it is stopped right after a report and its run
directory keeps every finished epoch.  The Tune checkpoint of a report is a marker holding the
epoch just reported; the trainer's own checkpoints live in the run dir.  A restored trial first
reports the epochs its trainer finished but Tune had not received (a driver killed between the
trainer's checkpoint and the report), before it trains another one: the scheduler decides on
them as it would have, and a trial it stops there trains nothing more.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from trd_hpc.config import ConfigError, validate_experiment
from trd_hpc.fsio import atomic_write_text
from trd_hpc.rundir import RunDir
from trd_hpc.tune.spec import SCORE_KEY, Sweep, dumps, score

TRIAL_FILE = "trial.json"
FAILED_FILE = "FAILED"
PROGRESS_FILE = "progress.json"


def history(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).history()


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def recorded_params(trial_dir: Path, params: dict) -> dict:
    """The parameters this trial's run was started with, when it was started already.

    A driver killed between Ray's snapshots can come back with the search algorithm's state
    ahead of its trial list: the restored trial then gets the next sample, not the one its run
    directory was trained with, and resuming that run would fail on the changed config every
    time. The run on disk wins: it goes on with its own parameters, and trial.json keeps saying
    which (the sweep's summaries read them from there)."""
    info = read_json(trial_dir / TRIAL_FILE)
    old = (info or {}).get("params")
    if old is None or old == params or not (trial_dir / "run" / "config.yaml").exists():
        return params
    print(
        f"trial {trial_dir.name}: restored with {params}, but its run was started with {old}; continuing that run",
        file=sys.stderr,
        flush=True,
    )
    return dict(old)


def _write_trial_file(trial_dir: Path, tc, params: dict, run_dir: Path) -> None:
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
    _write_trial_file(trial_dir, tc, params, run_dir)
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

    def catch_up(rows: list[dict]) -> None:
        for r in rows:  # epochs finished before a restart, in order
            if r["epoch"] > reported["epoch"]:
                report(r)

    # before training on: ASHA may stop the trial on an epoch it has not seen yet
    catch_up(history(run_dir))
    try:
        train_run(
            cfg, run_dir, resume="auto", progress=False, on_epoch=lambda tr, row: catch_up(list(tr.state.history))
        )
    except TrainingError as e:  # e.g. a NaN loss at a high learning rate: the trial ends, the sweep goes on
        atomic_write_text(trial_dir / FAILED_FILE, f"{e}\n")
        print(f"trial {tc.get_trial_id()} failed: {e}", file=sys.stderr, flush=True)
        return
    catch_up(history(run_dir))  # a restored trial whose trainer had already finished
