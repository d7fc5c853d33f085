"""``trd-hpc train``, ``cv``, ``evaluate``, ``report``: the experiment layer from the shell."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from trd_hpc.cli.common import EPILOG, add_generate, add_overrides, format_final, verb


def load_for_launch(config: str, overrides: list[str]):
    """The config with what an srun launch implies (several tasks -> DDP, threads = CPUs per
    task; trd_hpc.train.plan), so the sbatch scripts pass the user's arguments through as they are."""
    from trd_hpc.config import load_config
    from trd_hpc.train.plan import implied_overrides, slurm_tasks

    tasks, cpus = slurm_tasks()
    cfg = load_config(config, overrides)
    implied = implied_overrides(overrides, tasks, cpus, cfg.train.strategy)
    return load_config(config, implied) if implied != list(overrides or []) else cfg


def with_generate(a) -> list[str]:
    """The overrides, with data.generate=true when --generate was given."""
    return list(a.overrides or []) + (["data.generate=true"] if getattr(a, "generate", False) else [])


def interrupted(run_dir: Path) -> KeyboardInterrupt:
    """Ctrl-C: what is kept and the command that continues (the same one: it resumes)."""
    from trd_hpc.train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    kept = f"newest checkpoint kept: {found[0][1]} (step {found[0][0]})" if found else "no checkpoint written yet"
    cmd = shlex.join(["trd-hpc", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
    return KeyboardInterrupt(f"interrupted; {kept}; continue with: {cmd}")


def _train(a) -> int:
    from trd_hpc.train import signals

    signals.install()  # before the slow imports, so an early pre-emption is not lost
    from trd_hpc import experiment
    from trd_hpc.tasks import spec_for

    cfg = load_for_launch(a.config, with_generate(a))
    try:
        metrics = experiment.train(cfg, a.out, resume=a.resume, evaluate=not a.no_eval, progress=not a.quiet)
    except KeyboardInterrupt:
        raise interrupted(Path(a.out)) from None
    if metrics is not None:
        print(format_final(metrics, spec_for(cfg).summary_keys))
        report = Path(a.out) / "report.html"
        if report.exists():
            print(f"report: {report}")
    return 0


def _cv(a) -> int:
    from trd_hpc.train import signals

    signals.install()
    from trd_hpc.cv import format_summary, run_cv
    from trd_hpc.tasks import spec_for

    cfg = load_for_launch(a.config, with_generate(a))
    try:
        summary = run_cv(cfg, Path(a.out), folds=a.folds, fold=a.fold, only_aggregate=a.aggregate, progress=not a.quiet)
    except KeyboardInterrupt:
        cmd = shlex.join(["trd-hpc", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
        raise KeyboardInterrupt(f"interrupted; finished folds are kept; continue with: {cmd}") from None
    if summary is None:
        print("fold done; the summary is written when every fold has finished")
    else:
        print(format_summary(summary, spec_for(cfg).cv_keys))
        print(f"summary: {Path(a.out) / 'cv_summary.json'}")
    return 0


def _evaluate(a) -> int:
    from trd_hpc import experiment

    m = experiment.evaluate(Path(a.run_dir), figures=not a.no_figures, overrides=a.overrides)
    if m is None:
        return 3
    print(f"metrics: {Path(a.run_dir) / 'metrics.json'} ({len(m)} values)")
    return 0


def _report(a) -> int:
    from trd_hpc.evaluation import write_run_report

    print(f"report: {write_run_report(Path(a.run_dir))}")
    return 0


def _reproduce(a) -> int:
    from trd_hpc.reproduce import reproduce

    reproduce(a.paper, a.out, scale=a.scale, progress=not a.quiet)
    return 0


def _study(a) -> int:
    from trd_hpc.study import missing_genotypes

    try:
        rates = [float(r) for r in a.rates.split(",")]
    except ValueError:
        from trd_hpc.errors import ConfigError

        raise ConfigError(f"--rates {a.rates!r}: comma-separated fractions, e.g. 0,0.3,0.6") from None
    _, md = missing_genotypes(a.out, config=a.config, rates=rates, overrides=a.overrides or [], progress=not a.quiet)
    print(md)
    return 0


def add_parsers(sub) -> None:
    t = verb(
        sub,
        "train",
        _train,
        help="train a model on an existing cohort (or --generate one), evaluate it, write the report",
        description="Train CONFIG's model on its cohort (data.cohort), which must exist (`trd-hpc generate`, "
        "`trd-hpc ingest`) unless --generate is given. train.strategy=single|ddp|deepspeed; "
        "launch ddp/deepspeed with torchrun --nproc_per_node=N or as SLURM tasks under srun. Then the "
        "baselines of eval.baselines are trained (one process) and the run is evaluated. The same command "
        "run again on its --out continues the run (its config must match); Ctrl-C names the checkpoint kept.",
        epilog=EPILOG,
    )
    t.add_argument(
        "config",
        help="experiment YAML (configs/emt_tiny.yaml, ...) or a packaged config by name (emt_tiny, cnn3d: `trd-hpc config list`)",
    )
    t.add_argument("--out", required=True, help="run directory (created; holds checkpoints, metrics, report)")
    t.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default="auto",
        metavar="auto|never|fresh|CHECKPOINT",
        help="auto (default): continue the run in --out from its newest readable checkpoint when its config "
        "matches (a directory whose checkpoints are all unreadable is an error); never: refuse a --out that "
        "holds a run; fresh: start the run in --out again from step 0 (removes its checkpoints, weights and "
        "metrics); CHECKPOINT: continue from that file",
    )
    add_generate(t)
    t.add_argument("--no-eval", action="store_true", help="skip calibration, baselines, figures and the report")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overrides(t)

    cv = verb(
        sub,
        "cv",
        _cv,
        help="k-fold cross-validation (folds in turn, or one per SLURM array task), then mean and sd",
        description="Train every fold of the cohort's stratified k-fold split (test = fold k) and write "
        "cv_summary.json with the mean and sd of every metric.",
        epilog=EPILOG,
    )
    cv.add_argument("config", help="experiment YAML, or a packaged config by name (`trd-hpc config list`)")
    cv.add_argument("--out", required=True, help="directory for fold-K run directories and cv_summary.json")
    cv.add_argument("--folds", type=int, default=None, help="number of folds (must match cohort.split.folds)")
    cv.add_argument("--fold", type=int, default=None, help="train only this fold (a SLURM array task)")
    cv.add_argument("--aggregate", action="store_true", help="only write the summary of finished folds")
    cv.add_argument("--quiet", action="store_true", help="no progress bars")
    add_generate(cv)
    add_overrides(cv)

    ev = verb(
        sub,
        "evaluate",
        _evaluate,
        help="redo calibration, importance, baselines, figures and report of a run",
        description="Evaluate a trained run again. eval.* overrides (e.g. eval.baselines=[resnet18]) are "
        "written into the run's config.yaml first; a baseline already trained in RUN_DIR/baselines/NAME is "
        "reused, a new one trained first.",
    )
    ev.add_argument("run_dir", help="run directory of a finished training (RUN_DIR/model.pt)")
    ev.add_argument("--no-figures", action="store_true", help="metrics and bundle only, no figures (faster)")
    add_overrides(ev, "eval.* overrides of the run's config")
    rp = verb(sub, "report", _report, help="rewrite report.html of a run from its metrics and figures")
    rp.add_argument("run_dir", help="run directory with metrics.json (RUN_DIR/report.html is written)")

    rep = verb(
        sub,
        "reproduce",
        _reproduce,
        help="a paper's whole pipeline (generate, train, baselines, CV, evaluate) and its table, in one directory",
        description="Run every stage of a paper's reproduction into --out, each as the trd-hpc command it "
        "lists, and write OUT/reproduction.md: the paper's headline figures beside ours, read from the "
        "run's metrics files, with the commands and their wall times. A rerun skips finished stages "
        "(an interrupted training stage resumes from its checkpoint).\n\n"
        "  paper000  EMT: generate, train, baselines + calibration + evaluation\n"
        "  paper001  dual-path 3-D CNN: generate, train, three baselines, evaluation, 5-fold CV\n\n"
        "--scale tiny uses configs/*_tiny.yaml and a few epochs (minutes); --scale paper the papers' "
        "configs (paper001: hours on two cores; the reductions are listed in the table's notes).",
    )
    rep.add_argument("paper", help="paper000 or paper001 (or the paper of a task you registered)")
    rep.add_argument("--out", required=True, help="directory of the whole reproduction (cohort, runs, table)")
    rep.add_argument("--scale", choices=["tiny", "paper"], default="tiny", help="tiny (default, minutes) or paper")
    rep.add_argument("--quiet", action="store_true", help="only the stage lines, not each command's output")
    _add_study(sub)


def _add_study(sub) -> None:
    st = verb(
        sub,
        "study",
        _study,
        help="a question answered by training: missing-genotypes (keep the subjects vs drop them, per rate)",
        description="missing-genotypes: for each rate of --rates, a synthetic EMT cohort with that fraction of "
        "subjects' genotypes hidden (cohort.missing.snp), and two runs on it: keep (every subject, absent "
        "genotypes as the missing token) and drop (data.complete_cases=[genotypes]: those subjects left out of "
        "train and val). The test split is never filtered and is the same in every cell. Prints the table of "
        "test AUC (overall, and for test subjects with and without genotypes, each with its number of "
        "subjects) and writes it to OUT/missing_genotypes.md and .json. A rerun skips finished runs.",
        epilog=EPILOG,
    )
    st.add_argument("name", choices=["missing-genotypes"], help="the study")
    st.add_argument("--out", required=True, help="directory of the study (cohorts, runs, table)")
    st.add_argument(
        "--config",
        default="emt_missing_genotypes",
        help="EMT config of the cohort and the runs (default: the packaged emt_missing_genotypes, whose SNPs "
        "carry most of the signal)",
    )
    st.add_argument("--rates", default="0,0.3,0.6", help="fractions of subjects without genotypes (default 0,0.3,0.6)")
    st.add_argument("--quiet", action="store_true", help="each run's output to OUT/logs/STAGE.log")
    add_overrides(st, "dotted overrides of the config, for every cohort and run (train.max_epochs=5)")
