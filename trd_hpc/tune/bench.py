"""``trd-hpc bench tune``: the paper's grid search against ASHA, same budget, one run.

Both sweeps start from the same base config, train on the same cohort, run the same
number of trials with the same max_t on the same Ray cluster:
* grid: tune/cnn3d_grid.yaml under fifo, every trial for max_t epochs;
* ASHA: tune/cnn3d_asha.yaml (continuous ranges over the same hyper-parameters),
  ``num_samples`` set so it runs as many trials as the grid.
Figures: the best validation metric of each, the trial-epochs each spent, wall time.
Targets: ASHA's best within 1 accuracy point (0.01; an AUC metric: 0.005) of the grid's
best, with at most 1/3 of the grid's trial-epochs.  Each sweep is resumable: rerunning
the command continues where it stopped and reuses a finished sweep.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from trd_hpc.config import ConfigError
from trd_hpc.fsio import atomic_write_text
from trd_hpc.tune.spec import dumps, load_spec
from trd_hpc.tune.sweep import prepare_cohort, run_sweep, start_ray

DEFAULT_GRID = "tune/cnn3d_grid.yaml"
DEFAULT_ASHA = "tune/cnn3d_asha.yaml"
DEFAULT_OUT = "runs/bench-tune"
EPOCH_RATIO_TARGET = 1 / 3


def tolerance(metric: str) -> float | None:
    """How far ASHA's best may fall behind the grid's for the target to hold."""
    name = metric.rsplit(".", 1)[-1]
    if name == "accuracy":
        return 0.01
    if name == "auc":
        return 0.005
    return None


def run_bench(
    spec_grid: str | Path = DEFAULT_GRID,
    spec_asha: str | Path = DEFAULT_ASHA,
    out_dir: str | Path = DEFAULT_OUT,
    base: str | Path | None = None,
    address: str | None = None,
    overrides=(),
    max_t: int | None = None,
    verbose: int = 0,
) -> dict:
    grid = load_spec(spec_grid, base=base, overrides=tuple(overrides), updates={"scheduler": "fifo", "max_t": max_t})
    n = grid.spec.num_trials
    asha0 = load_spec(
        spec_asha, base=base, overrides=tuple(overrides), updates={"scheduler": "asha", "max_t": grid.spec.max_t}
    )
    samples = math.ceil(n / asha0.spec.grid_size)
    asha = load_spec(
        spec_asha,
        base=base,
        overrides=tuple(overrides),
        updates={"scheduler": "asha", "max_t": grid.spec.max_t, "num_samples": samples},
    )
    if (grid.spec.metric, grid.spec.mode, grid.spec.tie_breaker) != (
        asha.spec.metric,
        asha.spec.mode,
        asha.spec.tie_breaker,
    ):
        raise ConfigError(
            f"the two specs optimise different things: {grid.spec.metric} ({grid.spec.mode}, "
            f"tie-breaker {grid.spec.tie_breaker}) vs {asha.spec.metric} ({asha.spec.mode}, "
            f"tie-breaker {asha.spec.tie_breaker})"
        )
    cg, ca = grid.trial_data({}).get("cohort"), asha.trial_data({}).get("cohort")
    if cg != ca or grid.task != asha.task:
        raise ConfigError(
            f"{grid.source} and {asha.source} start from different tasks or cohorts "
            f"({grid.base_path}, {asha.base_path}); pass --base to use one config for both"
        )
    if grid.trial_data({}).get("data", {}).get("cohort") != asha.trial_data({}).get("data", {}).get("cohort"):
        raise ConfigError("the two specs point data.cohort at different directories; pass --base or data.cohort=DIR")
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"bench tune: {grid.task}, {n} trials each, max_t {grid.spec.max_t}, metric {grid.spec.metric} "
        f"({grid.spec.mode}); sweeps in {out_dir}",
        flush=True,
    )
    prepare_cohort(grid)  # once, before either sweep

    started = start_ray(address, log_to_driver=verbose > 0)
    try:
        t0 = time.perf_counter()
        g = run_sweep(grid, out_dir / "grid", verbose=verbose, progress=False)
        a = run_sweep(asha, out_dir / "asha", verbose=verbose, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()
    metric, mode = grid.spec.metric, grid.spec.mode
    tol = tolerance(metric)
    gv, av = g["value"], a["value"]
    quality = None
    if tol is not None and gv is not None and av is not None:
        quality = bool(av >= gv - tol) if mode == "max" else bool(av <= gv + tol)
    ratio = a["trial_epochs"] / g["trial_epochs"] if g["trial_epochs"] else None
    res = {
        "task": grid.task,
        "metric": metric,
        "mode": mode,
        "max_t": grid.spec.max_t,
        "trials": {"grid": g["num_trials"], "asha": a["num_trials"]},
        "best": {"grid": gv, "asha": av},
        "best_params": {"grid": g["params"], "asha": a["params"]},
        "trial_epochs": {"grid": g["trial_epochs"], "asha": a["trial_epochs"]},
        "stopped_early": {"grid": g["stopped_early"], "asha": a["stopped_early"]},
        "wall_seconds": {"grid": g["wall_seconds"], "asha": a["wall_seconds"]},
        "finished": {"grid": g["finished"], "asha": a["finished"]},
        "epoch_ratio": ratio,
        "targets": {
            "quality": {"tolerance": tol, "holds": quality},
            "epochs": {
                "max_ratio": EPOCH_RATIO_TARGET,
                "holds": None if ratio is None else bool(ratio <= EPOCH_RATIO_TARGET),
            },
        },
        "this_run_seconds": seconds,
        "out": str(out_dir),
    }
    atomic_write_text(out_dir / "bench_tune.json", dumps(res) + "\n")
    return res


def format_bench(r: dict) -> str:
    def f(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = [
        ("", "grid (fifo)", "ASHA"),
        (f"best {r['metric']}", f(r["best"]["grid"]), f(r["best"]["asha"])),
        ("trials", f(r["trials"]["grid"]), f(r["trials"]["asha"])),
        ("trial-epochs", f(r["trial_epochs"]["grid"]), f(r["trial_epochs"]["asha"])),
        ("stopped early", f(r["stopped_early"]["grid"]), f(r["stopped_early"]["asha"])),
        ("wall s", f"{r['wall_seconds']['grid']:.1f}", f"{r['wall_seconds']['asha']:.1f}"),
    ]
    w = [max(len(x[i]) for x in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    q, e = r["targets"]["quality"], r["targets"]["epochs"]

    def verdict(h):
        return "n/a" if h is None else ("holds" if h else "MISSED")

    tol = "no target for this metric" if q["tolerance"] is None else f"within {q['tolerance']:g} of the grid's best"
    lines.append(f"target ASHA {tol}: {verdict(q['holds'])}")
    ratio = "-" if r["epoch_ratio"] is None else f"{r['epoch_ratio']:.3f}"
    lines.append(f"target ASHA trial-epochs <= 1/3 of the grid's: {ratio} -> {verdict(e['holds'])}")
    if not all(r["finished"].values()):
        lines.append("note: a sweep did not finish; rerun the same command to complete it")
    return "\n".join(lines)
