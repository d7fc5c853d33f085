"""``trd-hpc bench tune``: the paper's grid search against ASHA, same budget, one run.

Both sweeps start from the same base config, train on the same cohort, run the same
number of trials with the same max_t on the same Ray cluster:
* grid: tune/cnn3d_grid.yaml under fifo, every trial for max_t epochs;
* ASHA: tune/cnn3d_tpe.yaml (continuous ranges over the same hyper-parameters, each trial drawn
  by Optuna's TPE from the results before it), ``num_samples`` set so it runs as many trials as
  the grid, once per search seed (``seeds``; its draws and so its trials differ).
  ``--spec-asha cnn3d_asha`` runs ASHA over random draws instead.
The validation split is made large enough to measure with (``val_subjects``, default 360: one
subject moves accuracy by 0.28 points, not the tiny cohort's 3.2) while the training split keeps
the base config's size, so a trial costs about the same. Figures: the best validation metric of
each, the trial-epochs each spent, wall time. Target, for each seed alone: ASHA reaches the grid's
best within 1 accuracy point (0.01; an AUC metric: 0.005) with at most 1/3 of the grid's
trial-epochs; the bench says in how many of the seeds it held (the means over the seeds too).
Each sweep is resumable: rerunning the command continues where it stopped and reuses a finished
sweep (a fresh ``--out`` measures everything again, in one run).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from trd_hpc.config import ConfigError
from trd_hpc.fsio import atomic_write_text
from trd_hpc.tune.spec import dumps, load_spec
from trd_hpc.tune.sweep import prepare_cohort, run_sweep, start_ray

DEFAULT_GRID = "cnn3d_grid"  # packaged sweep specs (trd_hpc.resources)
DEFAULT_ASHA = "cnn3d_tpe"
DEFAULT_OUT = "runs/bench-tune"
EPOCH_RATIO_TARGET = 1 / 3
VAL_SUBJECTS = 360


def bigger_validation(base_data: dict, val_subjects: int) -> list[str]:
    """Cohort overrides that give a volume cohort ``val_subjects`` validation subjects and the
    same number of training subjects as before (test keeps its fraction)."""
    c = base_data.get("cohort", {})
    if c.get("kind") != "volume":
        raise ConfigError(
            f"--val-subjects needs a volume cohort (the 3-D CNN's), not {c.get('kind')!r}; pass --val-subjects 0 "
            f"and set the split with cohort overrides"
        )
    split = c.get("split", {})
    n, test, val = int(c["n_subjects"]), float(split.get("test", 0.15)), float(split.get("val", 0.15))
    train = n * (1 - test) * (1 - val)
    new_n = math.ceil((train + val_subjects) / (1 - test))
    return [f"cohort.n_subjects={new_n}", f"cohort.split.val={val_subjects / (train + val_subjects):.6f}"]


def _mean_sd(v: list[float]) -> dict:
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}


def tolerance(metric: str) -> float | None:
    """How far ASHA's best may fall behind the grid's for the target to hold."""
    name = metric.rsplit(".", 1)[-1]
    if name == "accuracy":
        return 0.01
    if name == "auc":
        return 0.005
    return None


def _load_specs(spec_grid, spec_asha, base, overrides, max_t, seeds: int, val_subjects: int):
    """The grid spec under fifo and one ASHA spec per search seed, as many trials each: ``(grid, ashas)``."""
    if val_subjects:
        probe = load_spec(spec_grid, base=base, overrides=tuple(overrides), updates={"scheduler": "fifo"})
        overrides = (*bigger_validation(probe.base_data, val_subjects), *overrides)  # the caller's win
    grid = load_spec(spec_grid, base=base, overrides=tuple(overrides), updates={"scheduler": "fifo", "max_t": max_t})
    n = grid.spec.num_trials
    asha0 = load_spec(
        spec_asha, base=base, overrides=tuple(overrides), updates={"scheduler": "asha", "max_t": grid.spec.max_t}
    )
    samples = math.ceil(n / asha0.spec.grid_size)
    ashas = [
        load_spec(
            spec_asha,
            base=base,
            overrides=tuple(overrides),
            updates={
                "scheduler": "asha",
                "max_t": grid.spec.max_t,
                "num_samples": samples,
                "seed": asha0.spec.seed + k,
            },
        )
        for k in range(max(1, seeds))
    ]
    return grid, ashas


def _check_comparable(grid, asha) -> None:
    """Raise ConfigError unless both sweeps optimise the same thing on the same task and cohort."""
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


def _run_sweeps(grid, ashas, out_dir: Path, address: str | None, verbose: int):
    """The grid sweep, then each ASHA sweep, on one Ray cluster: ``(grid summary, ASHA summaries, seconds)``."""
    started = start_ray(address, log_to_driver=verbose > 0)
    try:
        t0 = time.perf_counter()
        g = run_sweep(grid, out_dir / "grid", verbose=verbose, progress=False)
        runs = [
            run_sweep(s, out_dir / ("asha" if k == 0 else f"asha-seed{k}"), verbose=verbose, progress=False)
            for k, s in enumerate(ashas)
        ]
        seconds = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()
    return g, runs, seconds


def _reaches(av, gv, tol: float | None, mode: str) -> bool | None:
    if tol is None or gv is None or av is None:
        return None
    return bool(av >= gv - tol) if mode == "max" else bool(av <= gv + tol)


def _within_budget(a: dict, g: dict) -> bool | None:
    return None if not g["trial_epochs"] else bool(a["trial_epochs"] / g["trial_epochs"] <= EPOCH_RATIO_TARGET)


def _per_seed(ashas, runs: list[dict], g: dict, tol: float | None, mode: str) -> list[dict]:
    """Each ASHA seed's figures and its own verdict against the grid."""
    out = []
    for sw, r in zip(ashas, runs):
        reaches, budget = _reaches(r["value"], g["value"], tol, mode), _within_budget(r, g)
        behind = None
        if r["value"] is not None and g["value"] is not None:
            behind = (g["value"] - r["value"]) if mode == "max" else (r["value"] - g["value"])
        out.append(
            {
                "seed": sw.spec.seed,
                "best": r["value"],
                "behind_grid": behind,  # how far below the grid's best (negative: above it)
                "params": r["params"],
                "trials": r["num_trials"],
                "trial_epochs": r["trial_epochs"],
                "epoch_ratio": r["trial_epochs"] / g["trial_epochs"] if g["trial_epochs"] else None,
                "stopped_early": r["stopped_early"],
                "wall_seconds": r["wall_seconds"],
                "finished": r["finished"],
                "reaches": reaches,
                "within_budget": budget,
                "holds": None if reaches is None or budget is None else bool(reaches and budget),
            }
        )
    return out


def _summary(grid, ashas, g: dict, runs: list[dict], seconds: float, out_dir: Path) -> dict:
    """The bench's figures (bench_tune.json) from the grid's and the ASHA sweeps' summaries."""
    metric, mode = grid.spec.metric, grid.spec.mode
    tol = tolerance(metric)
    gv = g["value"]
    per_seed = _per_seed(ashas, runs, g, tol, mode)
    bests = [r["best"] for r in per_seed if r["best"] is not None]
    ratios = [r["epoch_ratio"] for r in per_seed if r["epoch_ratio"] is not None]
    # The means over the seeds, for comparison with earlier figures; the verdict is per seed.
    on_means = (
        None
        if not bests or not ratios or _reaches(statistics.fmean(bests), gv, tol, mode) is None
        else bool(_reaches(statistics.fmean(bests), gv, tol, mode) and statistics.fmean(ratios) <= EPOCH_RATIO_TARGET)
    )
    holding = sum(bool(r["holds"]) for r in per_seed)
    decided = all(r["holds"] is not None for r in per_seed)
    val_n = _val_subjects(g)
    return {
        "task": grid.task,
        "metric": metric,
        "mode": mode,
        "max_t": grid.spec.max_t,
        "search": ashas[0].spec.search_name,
        "spec_asha": ashas[0].source,
        "grid": {
            k: g[k]
            for k in ("value", "params", "num_trials", "trial_epochs", "stopped_early", "wall_seconds", "finished")
        },
        "asha_seeds": per_seed,
        "targets": {
            "tolerance": tol,
            "max_ratio": EPOCH_RATIO_TARGET,
            "seeds_holding": holding,
            "seeds": len(per_seed),
            "every_seed": bool(holding == len(per_seed)) if decided else None,
        },
        "asha_over_seeds": {
            "best": _mean_sd(bests),
            "trial_epochs": _mean_sd([float(r["trial_epochs"]) for r in per_seed]),
            "epoch_ratio": _mean_sd(ratios),
            "holds_on_means": on_means,
        },
        "val_subjects": val_n,
        "one_val_subject": (1 / val_n) if val_n else None,
        "this_run_seconds": seconds,
        "out": str(out_dir),
    }


def run_bench(
    spec_grid: str | Path = DEFAULT_GRID,
    spec_asha: str | Path = DEFAULT_ASHA,
    out_dir: str | Path = DEFAULT_OUT,
    base: str | Path | None = None,
    address: str | None = None,
    overrides=(),
    max_t: int | None = None,
    verbose: int = 0,
    seeds: int = 3,
    val_subjects: int = VAL_SUBJECTS,
) -> dict:
    grid, ashas = _load_specs(spec_grid, spec_asha, base, overrides, max_t, seeds, val_subjects)
    n = grid.spec.num_trials
    _check_comparable(grid, ashas[0])
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"bench tune: {grid.task}, {n} trials each, max_t {grid.spec.max_t}, metric {grid.spec.metric} "
        f"({grid.spec.mode}); sweeps in {out_dir}",
        flush=True,
    )
    prepare_cohort(grid, generate=True)  # the bench's own cohort, once, before either sweep

    g, runs, seconds = _run_sweeps(grid, ashas, out_dir, address, verbose)
    res = _summary(grid, ashas, g, runs, seconds, out_dir)
    atomic_write_text(out_dir / "bench_tune.json", dumps(res) + "\n")
    return res


def _val_subjects(summary: dict) -> int | None:
    """Validation subjects of the sweeps' cohort (from its manifest)."""
    from trd_hpc.data.manifest import load_manifest
    from trd_hpc.errors import TrdError

    try:
        return len(load_manifest(summary["cohort"]).subjects("val"))
    except (KeyError, OSError, TrdError):  # an older summary without the cohort: leave the figure out
        return None


def _verdict(s: dict, tol: float | None) -> str:
    if s["holds"] is None:
        return "n/a"
    if s["holds"]:
        return "holds"
    why = []
    if not s["reaches"]:
        why.append(f"{100 * s['behind_grid']:.2f} points below")
    if not s["within_budget"]:
        why.append(f"{s['epoch_ratio']:.3f}x")
    return "MISSED (" + ", ".join(why) + ")"


def format_bench(r: dict) -> str:
    def f(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    g, seeds, t = r["grid"], r["asha_seeds"], r["targets"]
    rows = [
        ("", "grid (fifo)", *(f"ASHA seed {s['seed']}" for s in seeds)),
        (f"best {r['metric']}", f(g["value"]), *(f(s["best"]) for s in seeds)),
        ("trials", f(g["num_trials"]), *(f(s["trials"]) for s in seeds)),
        ("trial-epochs", f(g["trial_epochs"]), *(f(s["trial_epochs"]) for s in seeds)),
        ("of the grid's", "1", *(f"{s['epoch_ratio']:.3f}x" if s["epoch_ratio"] is not None else "-" for s in seeds)),
        ("stopped early", f(g["stopped_early"]), *(f(s["stopped_early"]) for s in seeds)),
        ("wall s", f"{g['wall_seconds']:.1f}", *(f"{s['wall_seconds']:.1f}" for s in seeds)),
        ("target", "", *(_verdict(s, t["tolerance"]) for s in seeds)),
    ]
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = [f"ASHA's search: {r['search']} ({r['spec_asha']})"]
    lines += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    tol = "no target for this metric" if t["tolerance"] is None else f"within {t['tolerance']:g} of the grid's best"
    lines.append(
        f"target, each seed alone ({tol}, <= 1/3 of its trial-epochs): held in {t['seeds_holding']} of "
        f"{t['seeds']} seeds"
    )
    o = r["asha_over_seeds"]
    if len(seeds) > 1:
        verdict = {None: "n/a", True: "holds", False: "MISSED"}[o.get("holds_on_means")]
        lines.append(
            f"means over the {len(seeds)} seeds: best {o['best']['mean']:.4f} +- {o['best']['sd']:.4f}, trial-epochs "
            f"{o['trial_epochs']['mean']:.0f} +- {o['trial_epochs']['sd']:.0f} ({o['epoch_ratio']['mean']:.3f} of the "
            f"grid's) -> {verdict} on the means"
        )
    if r.get("val_subjects"):
        lines.append(
            f"validation split: {r['val_subjects']} subjects (one subject = {100 * r['one_val_subject']:.2f} points)"
        )
    if not (g["finished"] and all(s["finished"] for s in seeds)):
        lines.append("note: a sweep did not finish; rerun the same command to complete it")
    return "\n".join(lines)
