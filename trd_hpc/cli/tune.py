"""``trd-hpc tune SPEC --out DIR``: a Ray Tune sweep (Ray is imported only when one runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from trd_hpc.cli.common import add_generate, add_overrides, verb


def _tune(a) -> int:
    from trd_hpc.tune.sweep import BEST_CONFIG, BEST_FILE, format_result, run_sweep, unfinished_reason

    res = run_sweep(
        a.spec,
        a.out,
        base=a.base,
        address=a.address,
        scheduler=a.scheduler,
        overrides=tuple(a.overrides or ()) + (("data.generate=true",) if a.generate else ()),
        resume=not a.no_resume,
        spec_updates={"max_t": a.max_t, "num_samples": a.num_samples, "seed": a.seed},
        verbose=0 if a.quiet else 1,
        progress=not a.quiet,
        min_nodes=a.min_nodes,
    )
    print(format_result(res))
    out = Path(a.out)
    if res["finished"]:
        print(
            f"best: {out / BEST_FILE}\nconfig: {out / BEST_CONFIG}"
            if res["value"] is not None
            else f"summary: {out / BEST_FILE}"
        )
        return 0
    why, rc = unfinished_reason(out)
    print(why, file=sys.stderr)
    return rc


def add_parsers(sub) -> None:
    p = verb(
        sub,
        "tune",
        _tune,
        help="hyper-parameter sweep with Ray Tune (ASHA or the full grid)",
        description="Run the sweep of SPEC (tune/*.yaml): one trial = one training run of the spec's base config "
        "with sampled hyper-parameters, reporting every epoch; ASHA stops poor trials early. Writes "
        "best.json and best_config.yaml to --out; rerunning the same command resumes an interrupted sweep.",
    )
    p.add_argument("spec", help="sweep spec YAML (tune/cnn3d_asha.yaml, tune/cnn3d_grid.yaml, tune/emt_asha.yaml)")
    p.add_argument("--out", required=True, help="sweep directory (rerun the same command to resume it)")
    p.add_argument("--base", default=None, help="training config to start from instead of the spec's base")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to use ('auto': the one running on this machine or allocation); "
        "default: start a local one with this machine's cores",
    )
    p.add_argument(
        "--min-nodes",
        type=int,
        default=1,
        help="with --address: wait (up to 2 min) until this many Ray nodes have joined before the first trial "
        "(slurm/tune.sh passes the job's node count)",
    )
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=None, help="replace the spec's scheduler")
    p.add_argument("--max-t", type=int, default=None, help="replace the spec's max_t (epochs per trial)")
    p.add_argument("--num-samples", type=int, default=None, help="replace the spec's num_samples")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="replace the spec's search seed (SLURM array tasks sharing an Optuna journal: one seed each, "
        "e.g. --seed $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing sweep in --out")
    p.add_argument("--quiet", action="store_true", help="no Tune progress table")
    add_generate(p)
    add_overrides(p, "dotted overrides of the base config")
