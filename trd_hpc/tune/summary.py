"""What a sweep found, from its trials' run directories: ``best.json``, ``best_config.yaml``
and the lines ``trd-hpc tune`` prints.  The run dirs are the record of what was trained (a trial
stopped by ASHA keeps its finished epochs there), so the figures never depend on Ray's own
bookkeeping of a restored experiment."""

from __future__ import annotations

from pathlib import Path

from trd_hpc.config import to_yaml, validate_experiment
from trd_hpc.fsio import atomic_write_text
from trd_hpc.tune.spec import Sweep, dumps, score
from trd_hpc.tune.trial import FAILED_FILE, TRIAL_FILE, history, read_json

EXPERIMENT = "sweep"
BEST_FILE = "best.json"
BEST_CONFIG = "best_config.yaml"


def trial_summaries(out_dir: Path, sweep: Sweep) -> list[dict]:
    """Per trial (from the run dirs, the record of what was trained): params, epochs, best value."""
    metric, mode, max_t = sweep.spec.metric, sweep.spec.mode, sweep.spec.max_t
    out = []
    for tf in sorted((out_dir / EXPERIMENT).glob(f"*/{TRIAL_FILE}")):
        info = read_json(tf)
        if info is None:
            continue
        run_dir = Path(info["run_dir"])
        rows = history(run_dir)
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


def summarize(out_dir: Path, sweep: Sweep, cohort: str, state: dict, study: dict | None = None) -> dict:
    """best.json (returned) and best_config.yaml; ``study``: the shared Optuna study's counts, if any."""
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
        "search": spec.search_name,
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
    if study is not None:
        result["study"] = study
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
        + f"{res['failed']} failed, {res['wall_seconds']:.1f} s ({res['scheduler']}, max_t {res['max_t']}, "
        f"{res.get('search', 'random')} search)",
    ]
    st = res.get("study")
    if st:
        lines.append(
            f"study {st['name']!r} in {st['path']}: {st['trials']} trials ({st['finished']} finished), "
            f"{st['of_this_sweep']} of them this sweep's"
        )
    return "\n".join(lines)
