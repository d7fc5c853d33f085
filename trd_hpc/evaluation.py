"""The evaluation stage of a run, from its run directory alone; it trains nothing.

Reads config.yaml, metrics.jsonl, predictions/{val,test}.npz, model.pt and each
baseline's ``baselines/NAME/`` (trained before, by ``experiment.train_baselines``); adds
the task's own evaluation (the task registry's ``evaluate``: full test metrics,
calibration, importance, figures), the baselines' scores, and report.html.
``metrics.json`` keeps flat dotted keys (``test.auc``, ``calibrated.platt.accuracy``,
``baselines.random_forest.auc``).
"""

from __future__ import annotations

from pathlib import Path

from trd_hpc import faults
from trd_hpc.console import step
from trd_hpc.errors import RunDirError
from trd_hpc.locks import DirLock
from trd_hpc.rundir import RunDir, read_json


def check_inputs(run: RunDir):
    """Every file the evaluation reads, read and checked before anything is written:
    (config, metrics, history, predictions, the model with its weights loaded)."""
    from trd_hpc.tasks import make_task

    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: no such run directory")
    cfg = run.config()
    metrics, history = run.metrics(), run.history()
    preds = {split: run.predictions(split) for split in ("val", "test")}
    model = run.load_weights(make_task(cfg).build_model())
    return cfg, metrics, history, preds, model


def baseline_scores(cfg, run: RunDir) -> dict:
    """``baselines.NAME.KEY`` for each baseline of the config: its test metrics that the
    task's registry entry scores it on (a single-task model only on its own target)."""
    from trd_hpc.tasks import spec_for

    spec = spec_for(cfg)
    out = {}
    for name in cfg.eval.baselines:
        b = run.baseline(name)
        if not b.finished_training():
            raise RunDirError(
                f"{b.path}: baseline {name} has not been trained (`trd-hpc evaluate {run.path}` trains it)"
            )
        m = b.metrics()
        for k in spec.baselines[name].scored_on:
            if f"test.{k}" in m:
                out[f"baselines.{name}.{k}"] = m[f"test.{k}"]
    return out


def evaluate_run(run_dir: str | Path, figures: bool = True) -> dict:
    """Task evaluation + baseline scores + figures + report of a trained run; returns the
    metrics written to metrics.json."""
    from trd_hpc.tasks import spec_for

    run = RunDir(run_dir)
    with DirLock(run.path, "run directory"):  # nests inside train's own lock
        cfg, metrics, history, preds, model = check_inputs(run)
        spec = spec_for(cfg)
        extra, figs = spec.evaluate(cfg, run, model, history, preds, figures) if spec.evaluate else ({}, {})
        metrics.update(extra)
        metrics.update(baseline_scores(cfg, run))
        metrics = run.write_metrics(metrics)  # readers never see half a file
        if figs:
            run.write_json("figures/index.json", {k: str(Path(v).name) for k, v in figs.items()}, indent=None)
        with step("report"):
            write_run_report(run.path, metrics=metrics, cfg=cfg)
        from trd_hpc.bundle import write_bundle

        with step("bundle"):
            write_bundle(run.path)  # what `trd-hpc predict` reads: weights, calibrators, preprocessing, card
    return metrics


def _meta(cfg, metrics: dict) -> list[tuple[str, str]]:
    """The report's header line: what was trained on what, and how long."""
    co = cfg.cohort
    cohort = f"{getattr(co, 'kind', '?')}, {getattr(co, 'n_subjects', '?')} subjects"
    out = [("task", cfg.task), ("model", cfg.model.name), ("cohort", cohort)]
    if "test.n" in metrics:
        out.append(("test subjects", str(metrics["test.n"])))
    if "epochs_run" in metrics:
        best = f"best {metrics['best_epoch']} of " if "best_epoch" in metrics else ""
        out.append(("epochs", f"{best}{metrics['epochs_run']}"))
    return out


def banner(cfg, metrics: dict) -> tuple[str, str]:
    """(origin, text) of the line atop every report: which data its figures come from."""
    from trd_hpc.data.manifest import identity_line

    ident = metrics.get("cohort")
    if not isinstance(ident, dict) or "origin" not in ident:
        return "unknown", (
            "Data: this run did not record its cohort's identity (made before trd-hpc recorded it); "
            f"its config names {cfg.data.cohort}"
        )
    line = identity_line(ident)
    if ident["origin"] == "synthetic":
        return "synthetic", f"Data: {line}. Synthetic subjects: these figures say nothing about real patients."
    return "ingested", f"Data: {line}."


def write_run_report(run_dir: str | Path, metrics: dict | None = None, cfg=None) -> Path:
    """(Re)write report.html from the run's files: config, metrics, figures/index.json and
    what the task's ``report`` reads (its predictions and those of its baselines)."""
    from trd_hpc.config import to_yaml
    from trd_hpc.eval.report import write_report
    from trd_hpc.tasks import spec_for

    faults.point("report")
    run = RunDir(run_dir)
    if cfg is None:
        cfg = run.config()
    if metrics is None:
        metrics = run.metrics(required=True)
    figs = {}
    index = run.figures_dir / "index.json"
    if index.exists():
        figs = {k: run.figures_dir / v for k, v in read_json(index, "figure index").items()}
    spec = spec_for(cfg)
    parts = spec.report(cfg, run, metrics) if spec.report else None
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list) or len(v) <= 4}
    title = f"{spec.title} ({run.path.name})"
    return write_report(
        run.path, title, shown, figs, to_yaml(cfg), parts=parts, meta=_meta(cfg, metrics), banner=banner(cfg, metrics)
    )
