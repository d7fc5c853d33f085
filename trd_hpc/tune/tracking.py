"""A sweep's tracking: every trial's epochs logged from the driver through the same
``Tracker`` (``trd_hpc.tracking``: the ``Logger`` protocol) a training run uses.

The driver and not the trial: ASHA stops a trial inside its report, and a logger in the
trial would lose what it had not flushed; the driver receives every result Tune accepted.
Each trial gets one tracker, opened at its first result, in ``DIR/sweep/trial_<id>/tracking``
(beside the trainer's ``run/``): W&B (offline by default) and MLflow as the base config turns
them on.  The trial's own trainer logs neither (``Sweep.trial_data``) but keeps its
``metrics.csv``.  A result's Ray bookkeeping (``training_iteration``, ``pid``, ...) is left
out: a tracker sees the trainer's epoch rows, as in a run of its own.
"""

from __future__ import annotations

from pathlib import Path

from trd_hpc.config import validate_experiment

# Ray's own keys of a result (ray.tune.result.AUTO_RESULT_KEYS and a few more it adds)
RAY_KEYS = {
    "training_iteration",
    "time_total_s",
    "time_this_iter_s",
    "time_since_restore",
    "timesteps_total",
    "timesteps_since_restore",
    "iterations_since_restore",
    "episodes_total",
    "timestamp",
    "date",
    "pid",
    "hostname",
    "node_ip",
    "config",
    "checkpoint_dir_name",
    "trial_id",
    "experiment_tag",
    "done",
    "should_checkpoint",
}


def epoch_row(result: dict) -> dict:
    """The trainer's part of a Tune result."""
    return {
        k: v
        for k, v in result.items()
        if k not in RAY_KEYS and not k.startswith("config/") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def tracking_callbacks(sweep, out_dir: Path, experiment: str, cohort: str | None, threads: int | None) -> list:
    """The driver's callback when the base config turns on a tracker a trial does not keep itself."""
    tc = validate_experiment(dict(sweep.base_data), "base").tracking
    if not (tc.wandb or tc.mlflow):
        return []
    from ray.tune import Callback

    class TrialTracking(Callback):
        """One Tracker per trial, opened at its first result and finished at its end.

        The trackers' calls run on one thread of their own, in the order Tune delivered the
        results: opening a W&B run takes a second or more, and the driver's result
        processing (every trial's reports) must not wait for it."""

        def __init__(self):
            self.__setstate__({})

        def __getstate__(self):  # pickled with the Tuner: open trackers stay in this process
            return {}

        def __setstate__(self, state):
            self._open: dict = {}
            self._queue = None
            self._thread = None

        def _put(self, *item) -> None:
            import queue
            import threading

            if self._thread is None:
                self._queue = queue.Queue()
                self._thread = threading.Thread(target=self._work, name="trd-tune-tracking", daemon=True)
                self._thread.start()
            self._queue.put(item)

        def _work(self) -> None:
            while True:
                what, trial_id, params, payload = self._queue.get()
                if what == "stop":
                    return
                if what == "epoch":
                    self._tracker(trial_id, params).log_epoch(payload)
                else:
                    t = self._open.pop(trial_id, None)
                    if t is not None:
                        if payload["last"]:
                            t.log_summary(payload["last"])
                        t.finish(exit_code=payload["code"])

        def _tracker(self, trial_id: str, params: dict):
            from trd_hpc.tracking import Tracker

            t = self._open.get(trial_id)
            if t is None:
                data = sweep.trial_data(params, cohort=cohort, threads=threads, tracking_off=False)
                data.setdefault("tracking", {})["csv"] = False  # the trial's trainer writes its metrics.csv
                cfg = validate_experiment(data, f"trial {trial_id}")
                where = Path(out_dir) / experiment / f"trial_{trial_id}" / "tracking"
                group = cfg.tracking.group or Path(out_dir).name
                t = Tracker.start(cfg, where, job_type="tune", group=group, name=f"trial_{trial_id}")
                self._open[trial_id] = t
            return t

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._put("epoch", trial.trial_id, dict(trial.config), epoch_row(result))

        def _finish(self, trial, code: int) -> None:
            self._put("end", trial.trial_id, None, {"last": epoch_row(trial.last_result or {}), "code": code})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial, 0)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, 1)

        def on_experiment_end(self, trials, **info):
            for trial in trials:
                self._finish(trial, 0)  # those still open (an interrupted sweep)
            if self._thread is not None:
                self._put("stop", None, None, None)
                self._thread.join()

    return [TrialTracking()]
