"""How a sweep draws its trials (``search:`` in a spec): Ray's random/grid variant generator, or
Optuna's TPE through Ray Tune's ``OptunaSearch``, its study in memory or in a journal file.

TPE models the results of the trials before (the first ``n_startup_trials`` are drawn at random)
and draws the next trial where good results are likelier; under ASHA a trial stopped at a rung
tells TPE its value there.  Several trials at once: the running ones count as bad points for the
draw (TPE's constant liar), so two workers do not get the same point.

The journal (``storage: journal``) is Optuna's append-only log file: each process appends its
operations under a lock (a symlink made atomically, which NFS and Lustre honour, where SQLite's
locks do not) and replays the others' before it draws, so SLURM array tasks with their own
``--out`` and one ``path`` share one study.  Give each task its own ``--seed``: TPE's random
draws before it models depend only on the seed.
"""

from __future__ import annotations

import functools
from pathlib import Path

from trd_hpc.tune.spec import Sweep

DEFAULT_STARTUP = 10  # Optuna's own default


def journal_path(sweep: Sweep) -> Path | None:
    s = sweep.spec.search
    if s is None or s.storage != "journal":
        return None
    return Path(s.path).expanduser().absolute()


def study_name(sweep: Sweep) -> str:
    s = sweep.spec.search
    if s is not None and s.study_name:
        return s.study_name
    return Path(sweep.source).stem if sweep.source != "<spec>" else "trd-hpc"


def journal_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


@functools.cache
def _tagging_search_class():
    from ray.tune.search.optuna import OptunaSearch

    class TaggedOptunaSearch(OptunaSearch):
        """OptunaSearch that writes, on each Optuna trial, the sweep directory and Ray's trial id
        that ran it (a shared study then says which process ran which trial)."""

        def __init__(self, *a, sweep_dir: str = "", **kw):
            super().__init__(*a, **kw)
            self._sweep_dir = sweep_dir

        def suggest(self, trial_id: str):
            params = super().suggest(trial_id)
            t = self._ot_trials.get(trial_id)
            if t is not None and "sweep" not in t.user_attrs:
                t.set_user_attr("sweep", self._sweep_dir)
                t.set_user_attr("ray_trial_id", trial_id)
            return params

    return TaggedOptunaSearch


def search_algorithm(sweep: Sweep, out_dir: Path):
    """The Tuner's ``search_alg`` for the spec's ``search`` (and ``max_concurrent``)."""
    spec = sweep.spec
    if not spec.model_based:
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial
    s = spec.search
    sampler = optuna.samplers.TPESampler(
        seed=spec.seed,
        n_startup_trials=s.n_startup_trials or DEFAULT_STARTUP,
        multivariate=True,  # lr, clip norm and the focal terms act together
        constant_liar=True,
    )
    path = journal_path(sweep)
    alg = _tagging_search_class()(
        sampler=sampler,
        storage=journal_storage(path) if path else None,
        study_name=study_name(sweep) if path else None,
        sweep_dir=str(out_dir),
    )
    return ConcurrencyLimiter(alg, max_concurrent=spec.max_concurrent) if spec.max_concurrent else alg


def numbered_trial_dirname(trial) -> str:
    """``trial_<n>``, n the trial's place in the search (Ray's experiment tag starts with it):
    Ray names Optuna's trials with random ids, so a trial drawn again after a restore (it was
    drawn after the snapshot the sweep came back from) would get another directory, and the run
    it had started would be left behind, counted twice; the place is the same."""
    return f"trial_{int(trial.experiment_tag.split('_', 1)[0]):05d}"


def study_counts(sweep: Sweep, out_dir: Path) -> dict | None:
    """A shared study's trials: all, finished, and this sweep's (``None`` without a journal)."""
    path = journal_path(sweep)
    if path is None or not path.exists():
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name(sweep), storage=journal_storage(path))
    trials = study.get_trials(deepcopy=False)
    return {
        "name": study_name(sweep),
        "path": str(path),
        "trials": len(trials),
        "finished": sum(t.state.is_finished() for t in trials),
        "of_this_sweep": sum(t.user_attrs.get("sweep") == str(out_dir) for t in trials),
        "sweeps": sorted({t.user_attrs.get("sweep", "?") for t in trials}),
    }
