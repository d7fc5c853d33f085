"""One training run: cohort (made if missing) -> run directory -> Trainer -> final
predictions and metrics.  The files it writes are described in ``trd_hpc.rundir``;
what comes after (baselines, evaluation, report) is the experiment layer's.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from trd_hpc import faults
from trd_hpc.config import ConfigError, to_dict
from trd_hpc.console import labelled, say
from trd_hpc.data.generate import check_target_dir, generate
from trd_hpc.data.manifest import MANIFEST, cohort_identity, identity_line, load_manifest
from trd_hpc.fsio import atomic_write_json, atomic_write_with
from trd_hpc.locks import DirLock
from trd_hpc.rundir import PREEMPTED, RunDir
from trd_hpc.tasks import make_task
from trd_hpc.train import checkpoint as ckpt
from trd_hpc.train import distributed as D
from trd_hpc.train import signals
from trd_hpc.train.identity import RESUMABLE_CHANGES, differing_keys, flatten
from trd_hpc.train.trainer import Preempted, Trainer

if TYPE_CHECKING:
    from trd_hpc.config import ExperimentConfig

__all__ = ["train_run", "RESUMABLE_CHANGES", "read_run_config"]


def resolve_cohort(cfg: "ExperimentConfig") -> "ExperimentConfig":
    """``cfg`` with its ``cohort`` section taken from the manifest when ``data.cohort`` is an
    ingested cohort (``trd-hpc ingest``): real data describes itself (grid, frames, SNPs,
    clinical columns, classes), so a config written for synthetic data trains on it as it
    is.  Generated cohorts are left alone (their config must match, see ensure_cohort)."""
    from trd_hpc.config import derive
    from trd_hpc.data.kinds import kind_of

    root = Path(cfg.data.cohort)
    if not (root / MANIFEST).is_file():
        if not kind_of(cfg.cohort).generated:
            raise ConfigError(
                f"data.cohort={root}: no manifest.json, and an ingested cohort cannot be generated from the "
                f"config; run `trd-hpc ingest SPEC.yaml --out {root}` again"
            )
        if not cfg.data.generate:
            raise ConfigError(missing_cohort_message(root))
        return cfg
    m = load_manifest(root)
    kind = kind_of(m.config)
    if kind.generated:
        return cfg
    if getattr(m.config, "task", cfg.task) != cfg.task:
        raise ConfigError(
            f"data.cohort={root} is an ingested {m.config.task} cohort; this config trains task {cfg.task}"
        )
    if not m.labelled:
        raise ConfigError(
            f"data.cohort={root} is unlabelled (its ingest spec names no label column): it can be predicted "
            f"on, not trained or evaluated on"
        )
    if to_dict(cfg.cohort) == to_dict(m.config):
        return cfg
    return derive(cfg, {"cohort": to_dict(m.config)}, f"the config with the cohort section of {root / MANIFEST}")


def missing_cohort_message(root: Path) -> str:
    """data.cohort names no cohort: say so, with the closest existing ones and the two ways on."""
    from trd_hpc.data.manifest import nearby_cohorts

    near = nearby_cohorts(root)
    what = "no such directory" if not root.exists() else "no manifest.json there (not a finished cohort)"
    hint = f" (did you mean {' or '.join(str(p) for p in near)}?)" if near else ""
    return (
        f"data.cohort={root}: {what}{hint}; train on an existing cohort (`trd-hpc generate` or `trd-hpc ingest` "
        f"makes one), or pass --generate (data.generate=true) to make a synthetic one there from the config"
    )


def ensure_cohort(cfg: "ExperimentConfig", info: D.DistInfo, progress: bool = True) -> Path:
    """The config's cohort directory; generated first (by rank 0) only when absent and the
    config asks for it (data.generate), so a mistyped path never becomes a synthetic cohort."""
    cfg = resolve_cohort(cfg)  # refuses a missing cohort unless data.generate
    root = Path(cfg.data.cohort)
    if info.is_main and not (root / MANIFEST).exists():
        from trd_hpc.data.kinds import kind_of

        check_target_dir(cfg.cohort, root)  # never generate over another cohort's or tool's files
        what = (
            f"a synthetic cohort ({kind_of(cfg.cohort).generator or cfg.cohort.kind} generator, "
            f"seed {cfg.cohort.seed}, {cfg.cohort.n_subjects} subjects)"
        )
        if cfg.data.source == "virtual":
            from trd_hpc.data.generate import write_virtual

            say(f"data.generate: writing {what} at {root} as a virtual cohort (manifest only)")
            write_virtual(cfg.cohort, root)
        else:
            say(f"data.generate: generating {what} at {root}")
            generate(cfg.cohort, root, progress=progress)
    D.barrier(info)
    m = load_manifest(root)
    have = {k: v for k, v in to_dict(m.config).items() if k != "subjects_per_shard"}
    want = {k: v for k, v in to_dict(cfg.cohort).items() if k != "subjects_per_shard"}
    if have != want:
        diffs = sorted(k for k, v in flatten(want).items() if flatten(have).get(k) != v)
        raise ConfigError(
            f"data.cohort={root} holds a cohort made with another config (differs in: "
            f"{', '.join('cohort.' + k for k in diffs)}); point data.cohort at a new directory"
        )
    return root


def read_run_config(run_dir: Path):
    """The validated config.yaml of a run directory (RunDirError naming the file otherwise)."""
    return RunDir(run_dir).config()


RESUME_MODES = ("auto", "never", "fresh")


def prepare_run_dir(cfg, run_dir: Path, resume: str | None, info: D.DistInfo) -> str | None:
    """Check a run directory that already holds a run against this config, then write config.yaml.
    Returns what to resume from: 'auto', 'fresh', a checkpoint path, or None (a new run).

    ``resume``: 'auto' continues a run whose config matches (the same command rerun);
    'never' (or None, for library callers) refuses a directory that holds a run; 'fresh'
    starts the same run again from step 0, removing what its earlier training wrote;
    a path resumes from that checkpoint.  The config was fully validated before this
    point, so a failed start never leaves a config.yaml that would refuse the corrected one."""
    cfg_file = run_dir / "config.yaml"
    mode = "never" if resume is None else str(resume)
    if info.is_main:
        trained = bool(ckpt.list_checkpoints(run_dir)) or (run_dir / "model.pt").exists()
        if cfg_file.exists() and not trained:
            # A start that failed before its first checkpoint: nothing to keep, so a
            # corrected config simply replaces the one written then.
            say(f"{run_dir}: no checkpoint yet from the earlier start; starting afresh with this config")
        elif cfg_file.exists():
            if mode == "never":
                raise ConfigError(
                    f"{run_dir} already holds a run and resuming was not allowed (--resume never); rerun without "
                    f"it to continue the run (it continues when the config matches), or use another --out"
                )
            old = flatten(to_dict(read_run_config(run_dir)))
            diffs = differing_keys(old, flatten(to_dict(cfg)))
            if diffs:
                raise ConfigError(
                    f"cannot continue {run_dir}: the config differs from {cfg_file} in " + ", ".join(diffs) + "; "
                    "use another --out for a new run"
                )
            if mode == "fresh":
                removed = _remove_training_outputs(run_dir)
                say(f"{run_dir}: --resume fresh: starting the run again from step 0 (removed {removed})")
            elif mode == "auto":
                say(f"{run_dir} holds this run (same config): continuing it (--resume never refuses instead)")
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).write_config(cfg)
        (run_dir / PREEMPTED).unlink(missing_ok=True)
    D.barrier(info)
    return None if mode == "never" else mode


def _remove_training_outputs(run_dir: Path) -> str:
    """What --resume fresh clears: checkpoints, weights, metrics, predictions (not baselines:
    the config is the same, so they are still this run's)."""
    import shutil

    run = RunDir(run_dir)
    gone = []
    for p in (ckpt.checkpoint_dir(run_dir), run.path / "predictions"):
        if p.is_dir():
            n = sum(1 for _ in p.iterdir())
            shutil.rmtree(p)
            gone.append(f"{p.name}/ ({n} entries)")
    for p in (run.model_file, run.metrics_file, run.path / "metrics.jsonl"):
        if p.exists():
            p.unlink()
            gone.append(p.name)
    return ", ".join(gone) or "nothing"


def final_metrics(trainer: Trainer, val_m: dict, test_m: dict, seconds: float, hosts: list[str]) -> dict:
    st = trainer.state
    out = {f"val.{k}": v for k, v in val_m.items()}
    out.update({f"test.{k}": v for k, v in test_m.items()})
    out.update(
        {
            "best_epoch": trainer.early.best_epoch,
            "epochs_run": st.epoch,
            "stopped_early": st.stopped_early,
            "steps": st.step,
            "world_size": trainer.info.world_size,
            "hosts": hosts,  # rank r ran on hosts[r]
            "strategy": trainer.tc.strategy,
            "precision": trainer.precision,
            "train_seconds": seconds,
            "flops_per_sample": trainer.flops_per_sample,
        }
    )
    if st.history:
        out["train.samples_per_s"] = float(np.mean([r.get("train.samples_per_s", np.nan) for r in st.history]))
        out["train.mfu"] = float(np.mean([r.get("train.mfu", np.nan) for r in st.history]))
    return out


def train_run(
    cfg,
    run_dir: str | Path,
    resume: str | None = None,
    progress: bool = True,
    on_step=None,
    on_epoch=None,
    standalone: bool = False,
    then: Callable[[Path], dict | None] | None = None,
    label: str | None = None,
) -> dict | None:
    """Train one run; returns the final metrics on rank 0 (None elsewhere or when pre-empted).

    Its console lines start with ``[label]`` (default: the task, e.g. ``[emt]``).

    ``on_step(trainer)`` runs after every optimiser step and ``on_epoch(trainer, row)``
    after each epoch's checkpoint is written (Ray Tune reports there).  ``standalone``:
    one process whatever the launcher says (baselines trained by rank 0 of a DDP job).

    ``then(run_dir) -> metrics`` runs on rank 0 once training is done (the evaluation
    stage) while the other ranks wait, still part of the job: a rank that exits while
    rank 0 works can end the whole srun step (--kill-on-bad-exit) and take that work
    with it.  What it returns is the run's metrics from then on."""
    with labelled(label or default_label(cfg)):
        return _train_run(cfg, run_dir, resume, progress, on_step, on_epoch, standalone, then)


def default_label(cfg) -> str:
    """The task (``emt``, ``cnn3d``), with the model's name when it is not the task's own model
    (``[cnn3d resnet18]``), so a baseline trained as a run of its own says what it is."""
    model = getattr(cfg, "model", None)
    field = type(model).model_fields.get("name") if model is not None else None
    if field is None or model.name == field.default:
        return cfg.task
    return f"{cfg.task} {model.name}"


def _train_run(cfg, run_dir, resume, progress, on_step, on_epoch, standalone, then) -> dict | None:
    signals.install()
    from trd_hpc.tracking import Tracker, figures_of

    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    cfg = resolve_cohort(cfg)
    info = D.init(cfg.train.strategy, cfg.train.device, standalone=standalone)
    faults.set_rank(info.rank)
    tracker = Tracker.noop()
    lock = DirLock(run_dir, "run directory") if info.is_main else None
    try:
        try:
            root = ensure_cohort(cfg, info, progress)
            identity = cohort_identity(root)
            if info.is_main:
                say(f"cohort {root}: {identity_line(identity)}")
            if lock is not None:  # before anything is written into the run directory
                lock.acquire()
                ckpt.remove_stale(run_dir)
            resume = prepare_run_dir(cfg, run_dir, resume, info)
            tracker = Tracker.start(cfg, run_dir, info.rank, cohort=identity)  # rank 0 only; resumes its W&B id
            trainer = Trainer(cfg, make_task(cfg, str(root)), run_dir, info, root, progress=progress)
            if resume:
                path = trainer.load_checkpoint(resume)
                if info.is_main:
                    say(
                        f"resumed from {path} (epoch {trainer.state.epoch + 1}, step {trainer.state.step})"
                        if path
                        else "no checkpoint yet: starting from scratch"
                    )

            def _on_epoch(tr, row):
                tracker.log_epoch(row)
                if on_epoch is not None:
                    on_epoch(tr, row)

            t0 = time.perf_counter()
            try:
                trainer.fit(on_step=on_step, on_epoch=_on_epoch)
            except Preempted as p:
                if info.is_main:
                    atomic_write_json(
                        run_dir / PREEMPTED, {"step": p.step, "signal": p.signame, "checkpoint": str(p.path)}
                    )
                    say(f"{p}; continue with --resume auto")
                return None
            val_m, val_rec = trainer.evaluate("val")
            test_m, test_rec = trainer.evaluate("test")
            hosts = D.all_gather_objects(info, socket.gethostname())
            metrics = None
            if info.is_main:
                run.write_predictions("val", val_rec)
                run.write_predictions("test", test_rec)
                state = trainer.raw_model.state_dict()
                atomic_write_with(run.model_file, lambda tmp: torch.save(state, tmp), fault="model")
                metrics = final_metrics(trainer, val_m, test_m, time.perf_counter() - t0, hosts)
                metrics["cohort"] = identity  # what these figures rest on
                atomic_write_json(run.metrics_file, metrics, fault="metrics")
                tracker.log_summary(metrics)
            D.barrier(info)
            if then is not None:
                try:
                    if info.is_main:
                        metrics = then(run_dir)  # None: pre-empted during that stage
                        if metrics is not None:
                            tracker.log_summary(metrics)
                            tracker.log_figures(figures_of(run_dir))
                    else:
                        D.wait_for_main(info)
                finally:
                    if info.is_main:
                        D.release_others(info)
                D.barrier(info)  # rank 0 stays until every rank has seen the release
        finally:
            D.shutdown(info)
        return metrics
    finally:
        tracker.finish()
        if lock is not None:
            lock.release()
