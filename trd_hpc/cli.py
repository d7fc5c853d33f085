"""``trd-hpc``: the command line.  Thin: parse, load the config, call one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trd_hpc import __version__

EPILOG = """\
Overrides are dotted key=value pairs after the config, e.g.
  trd-hpc generate configs/emt.yaml --out /data/emt cohort.n_subjects=20000 cohort.fmri.dtype=float32
An unknown key or a value of the wrong type is an error that names the key.
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _cmd_generate(a: argparse.Namespace) -> int:
    from trd_hpc.config import load_config
    from trd_hpc.data.generate import generate

    cfg = load_config(a.config, a.overrides)
    out = Path(a.out or cfg.data.cohort)
    res = generate(
        cfg.cohort,
        out,
        num_shards=a.num_shards,
        workers=a.workers,
        shard_index=a.shard_index,
        finalize_only=a.finalize,
        verify_existing=not a.no_verify,
        progress=not a.quiet,
        force=a.force,
    )
    parts = []
    if res.made:
        parts.append(f"made {len(res.made)}")
    if res.remade:
        parts.append(f"remade {len(res.remade)} (" + "; ".join(f"{k}: {v}" for k, v in sorted(res.remade.items())) + ")")
    if res.kept:
        parts.append(f"kept {len(res.kept)} verified")
    rate = f", {res.subjects_written / res.seconds:.1f} subjects/s, {res.bytes_written / res.seconds / 1e6:.0f} MB/s" if res.subjects_written else ""
    print(f"shards: {', '.join(parts) or 'none to do'} in {res.seconds:.1f} s{rate}")
    if res.finalized:
        print(f"manifest: {out / 'manifest.json'}")
    else:
        print("manifest not written yet: other shards are still missing (run with --finalize when all are done)")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from trd_hpc.train import signals

    signals.install()  # before the slow imports, so an early pre-emption is not lost
    from trd_hpc.config import load_config
    from trd_hpc.train.run import train

    cfg = load_config(a.config, a.overrides)
    metrics = train(cfg, a.out, resume=a.resume, evaluate_after=not a.no_eval, progress=not a.quiet)
    if metrics is not None:
        keys = [k for k in ("test.auc", "test.ap", "test.accuracy", "test.severity_mae", "best_epoch") if k in metrics]
        print("final: " + "  ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys))
        report = Path(a.out) / "report.html"
        if report.exists():
            print(f"report: {report}")
    return 0


def _cmd_cv(a: argparse.Namespace) -> int:
    from trd_hpc.train import signals

    signals.install()
    from trd_hpc.config import load_config
    from trd_hpc.train.cv import format_summary, run_cv

    cfg = load_config(a.config, a.overrides)
    summary = run_cv(cfg, Path(a.out), folds=a.folds, fold=a.fold, only_aggregate=a.aggregate, progress=not a.quiet)
    if summary is None:
        print("fold done; the summary is written when every fold has finished")
    else:
        print(format_summary(summary))
        print(f"summary: {Path(a.out) / 'cv_summary.json'}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from trd_hpc.eval.pipeline import run_evaluation

    m = run_evaluation(Path(a.run_dir), figures=not a.no_figures, overrides=a.overrides)
    print(f"metrics: {Path(a.run_dir) / 'metrics.json'} ({len(m)} values)")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from trd_hpc.eval.pipeline import write_run_report

    print(f"report: {write_run_report(Path(a.run_dir))}")
    return 0


def _cmd_cohort_validate(a: argparse.Namespace) -> int:
    from trd_hpc.data.validate import validate_cohort_dir

    problems = validate_cohort_dir(a.dir, deep=not a.quick, progress=not a.quiet)
    for p in problems:
        print(f"BAD {p}", file=sys.stderr)
    if problems:
        print(f"{a.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{a.dir}: OK")
    return 0


def _cmd_cohort_info(a: argparse.Namespace) -> int:
    from trd_hpc.data.validate import cohort_summary

    print(cohort_summary(a.dir))
    return 0


def _cmd_config_show(a: argparse.Namespace) -> int:
    from trd_hpc.config import load_config, to_yaml

    print(to_yaml(load_config(a.config, a.overrides)), end="")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.what == "generate":
        from trd_hpc.bench.generate import run

        return run(a)
    if a.what == "load":
        from trd_hpc.bench.load import run

        return run(a)
    if a.what == "train":
        from trd_hpc.bench.train import run

        return run(a)
    if a.what == "faults":
        from trd_hpc.bench.faults import run

        return run(a)
    if a.what == "tune":
        from trd_hpc.tune.bench import run_bench_tune

        return run_bench_tune(a)
    raise SystemExit(f"unknown benchmark {a.what}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trd-hpc",
        description="Synthetic multimodal cohorts and distributed training of the EMT and dual-path 3-D CNN.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"trd-hpc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="write a synthetic cohort as sharded HDF5 plus manifest.json",
        description="Write the cohort of CONFIG's `cohort` section. Re-running keeps shards that verify and "
        "remakes missing or corrupt ones; the manifest is written when every shard is present.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("config", help="experiment YAML (configs/emt.yaml, configs/cnn3d_tiny.yaml, ...)")
    g.add_argument("--out", help="cohort directory (default: the config's data.cohort)")
    g.add_argument("--num-shards", type=int, help="number of shards (default: n_subjects / cohort.subjects_per_shard)")
    g.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    g.add_argument("--shard-index", type=int, help="write only this shard (one SLURM array task)")
    g.add_argument("--finalize", action="store_true", help="only write the manifest (all shards must exist)")
    g.add_argument("--no-verify", action="store_true", help="keep existing shards without re-reading their checksums")
    g.add_argument("--force", action="store_true",
                   help="write into a directory that holds other files or another cohort (replacing that cohort); "
                        "without it such a directory is refused untouched")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_overrides(g)
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser(
        "train",
        help="train a model (generates the config's cohort first when missing), evaluate it, write the report",
        description="Train CONFIG's model on its cohort (data.cohort). train.strategy=single|ddp|deepspeed; "
        "launch ddp/deepspeed with torchrun --nproc_per_node=N or as SLURM tasks under srun.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", help="experiment YAML (configs/emt_tiny.yaml, configs/cnn3d.yaml, ...)")
    t.add_argument("--out", required=True, help="run directory (created; holds checkpoints, metrics, report)")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest valid checkpoint in --out ('auto', the default value) or from a given checkpoint")
    t.add_argument("--no-eval", action="store_true", help="skip calibration, baselines, figures and the report")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_overrides(t)
    t.set_defaults(func=_cmd_train)

    cv = sub.add_parser(
        "cv",
        help="k-fold cross-validation (folds in turn, or one per SLURM array task), then mean and sd",
        description="Train every fold of the cohort's stratified k-fold split (test = fold k) and write "
        "cv_summary.json with the mean and sd of every metric.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cv.add_argument("config")
    cv.add_argument("--out", required=True, help="directory for fold-K run directories and cv_summary.json")
    cv.add_argument("--folds", type=int, default=None, help="number of folds (must match cohort.split.folds)")
    cv.add_argument("--fold", type=int, default=None, help="train only this fold (a SLURM array task)")
    cv.add_argument("--aggregate", action="store_true", help="only write the summary of finished folds")
    cv.add_argument("--quiet", action="store_true")
    _add_overrides(cv)
    cv.set_defaults(func=_cmd_cv)

    ev = sub.add_parser(
        "evaluate", help="redo calibration, importance, baselines, figures and report of a run",
        description="Evaluate a trained run again. eval.* overrides (e.g. eval.baselines=[resnet18]) are "
        "written into the run's config.yaml first; a baseline already trained in RUN_DIR/baselines/NAME is reused.",
    )
    ev.add_argument("run_dir")
    ev.add_argument("--no-figures", action="store_true")
    _add_overrides(ev)
    ev.set_defaults(func=_cmd_evaluate)
    rp = sub.add_parser("report", help="rewrite report.html of a run from its metrics and figures")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_cmd_report)

    from trd_hpc.compare import add_compare_parser

    add_compare_parser(sub)

    from trd_hpc.launch.submit import add_submit_parser

    add_submit_parser(sub)

    # Ray is imported only when a sweep runs
    from trd_hpc.tune.sweep import add_tune_parser

    add_tune_parser(sub)

    c = sub.add_parser("cohort", help="inspect a cohort directory")
    csub = c.add_subparsers(dest="cohort_cmd", required=True, metavar="ACTION")
    v = csub.add_parser("validate", help="check files against the manifest; exit 1 naming each bad file")
    v.add_argument("dir")
    v.add_argument("--quick", action="store_true",
                   help="structure, sizes, shapes, attributes, ids and labels only; no voxel is read (no content checksums)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_cmd_cohort_validate)
    i = csub.add_parser("info", help="print a summary of a cohort")
    i.add_argument("dir")
    i.set_defaults(func=_cmd_cohort_info)

    cf = sub.add_parser("config", help="show a resolved config")
    cfsub = cf.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    s = cfsub.add_parser("show", help="print CONFIG with overrides applied and defaults filled in")
    s.add_argument("config")
    _add_overrides(s)
    s.set_defaults(func=_cmd_config_show)

    b = sub.add_parser("bench", help="measure throughput against this machine's limits")
    b.add_argument("what", choices=["generate", "load", "train", "tune", "faults"],
                   help="generate: cohort writing; load: Dataset+DataLoader; train: Trainer vs a bare loop; "
                        "tune: the paper's grid against ASHA on the same trial budget; "
                        "faults: SIGKILL a run at random moments, resume, compare with an uninterrupted run")
    b.add_argument("--config", default=None, help="experiment YAML (default: configs/emt.yaml with few subjects)")
    b.add_argument("--subjects", type=int, default=None, help="subjects to use (default depends on the benchmark)")
    b.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    b.add_argument("--json", default=None, help="also write the figures to this JSON file")
    b.add_argument("--kills", type=int, default=20, help="faults: SIGKILLs to make (default 20)")
    b.add_argument("--seed", type=int, default=0, help="faults: seed of the kill delays (printed; default 0)")
    b.add_argument("--nproc", type=int, default=1, help="faults: processes per run (>1: torchrun + DDP; default 1)")
    _add_overrides(b)
    from trd_hpc.tune.bench import add_bench_tune

    add_bench_tune(b)  # bench tune's own options (--spec-grid, --spec-asha, --base, --max-t, ...)
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from trd_hpc.errors import TrdError

    parser = build_parser()
    # Overrides may come before or after the options (`generate CFG --out D k=v`).
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no KEY=VALUE overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    try:
        return int(args.func(args) or 0)
    except TrdError as e:
        # The project's own errors name the file or key and say what to do: one line.
        # Anything else (CUDA out of memory, NCCL, DeepSpeed, a bug) keeps its traceback,
        # since on a compute node the log is all a user has.
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
