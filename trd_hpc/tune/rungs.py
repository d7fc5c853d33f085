"""ASHA whose rung records are kept with the experiment, so a requeued sweep prunes as before.

Ray Tune pickles the scheduler into ``tuner.pkl`` when a sweep starts and never saves it again:
``Tuner.restore`` brings ASHA back with empty rungs (ray-project/ray#12389, #30584), and a sweep
requeued mid-rung (SLURM pre-emption) then compares its next trials with the few results it saw
since the restore.  Here the rungs (each milestone's recorded results) and every decision taken
are the state of a Tune callback (``RungRecords``), which Ray writes with each experiment snapshot
(``callback-states-*.pkl``, next to the trial states of the same moment) and hands back on
restore before any trial is requeued.  A result a restored trial reports again (an epoch the
driver had decided on after the snapshot it was restored from, or before) gets the decision
taken the first time; the epochs after the snapshot are decided again from the same records, in
the same order, so the restored sweep stops the trials the uninterrupted one stops.  A readable
copy of the records is written to ``rungs.json`` in the sweep's directory after each decision.
"""

from __future__ import annotations

import functools
from pathlib import Path

from trd_hpc.fsio import atomic_write_text
from trd_hpc.tune.spec import dumps

RUNGS_FILE = "rungs.json"


@functools.cache
def _classes():
    """The scheduler and its callback (Ray is imported only when a sweep runs)."""
    from ray.tune import Callback
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class RecordedASHA(AsyncHyperBandScheduler):
        """AsyncHyperBandScheduler that remembers its decisions and can give out and take back
        its rung records."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self._decisions: dict[str, dict[int, str]] = {}  # trial id -> {time_attr value: action}

        def on_trial_result(self, tune_controller, trial, result):
            t = result.get(self._time_attr)
            done = self._decisions.get(trial.trial_id, {})
            if t in done:  # a result reported again after a restore: the decision it had
                return done[t]
            action = super().on_trial_result(tune_controller, trial, result)
            if t is not None and self._metric in result:
                self._decisions.setdefault(trial.trial_id, {})[t] = action
            return action

        def records(self) -> dict:
            return {
                "brackets": [[[m, dict(rec)] for m, rec in b._rungs] for b in self._brackets],
                "decisions": {k: dict(v) for k, v in self._decisions.items()},
                "num_stopped": self._num_stopped,
            }

        def load_records(self, state: dict) -> None:
            brackets = state["brackets"]
            if [[m for m, _ in b] for b in brackets] != [[m for m, _ in b._rungs] for b in self._brackets]:
                raise ValueError("the saved rungs are of another ASHA (milestones differ)")
            for b, saved in zip(self._brackets, brackets):
                b._rungs = [(m, dict(rec)) for m, rec in saved]
            self._decisions = {k: dict(v) for k, v in state["decisions"].items()}
            self._num_stopped = int(state["num_stopped"])

    class RungRecords(Callback):
        """Saves the scheduler's rung records with each experiment snapshot and restores them;
        keeps ``out_dir/rungs.json`` current."""

        def __init__(self, scheduler, out_dir: str):
            self.scheduler = scheduler
            self.out_dir = out_dir

        def _write(self) -> None:
            atomic_write_text(Path(self.out_dir) / RUNGS_FILE, dumps(self.scheduler.records()) + "\n")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._write()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write()

        def get_state(self) -> dict:
            return {"asha": self.scheduler.records()}

        def set_state(self, state: dict) -> None:
            self.scheduler.load_records(state["asha"])
            self._write()

    return RecordedASHA, RungRecords


def recorded_asha(out_dir: Path, **kw):
    """``(scheduler, callback)``: ASHA with ``kw`` and the callback that keeps its rungs; pass
    both to the same Tuner (one pickle: the callback's scheduler is the Tuner's on restore)."""
    asha_cls, callback_cls = _classes()
    sched = asha_cls(**kw)
    return sched, callback_cls(sched, str(out_dir))


def rung_records(out_dir: Path) -> dict | None:
    """The rung records last written in a sweep directory (``None`` without ASHA)."""
    import json

    try:
        return json.loads((Path(out_dir) / RUNGS_FILE).read_text())
    except (OSError, ValueError):
        return None
