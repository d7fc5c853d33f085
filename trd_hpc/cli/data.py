"""``trd-hpc generate``, ``trd-hpc cohort validate|info``, ``trd-hpc config show``."""

from __future__ import annotations

import sys
from pathlib import Path

from trd_hpc.cli.common import EPILOG, add_overrides, verb

__all__ = ["EPILOG", "add_parsers"]


def _generate(a) -> int:
    from trd_hpc.config import load_config

    cfg = load_config(a.config, a.overrides)
    out = Path(a.out or cfg.data.cohort)
    if a.virtual:
        from trd_hpc.data.generate import write_virtual

        if a.shard_index is not None or a.finalize:
            from trd_hpc.errors import ConfigError

            raise ConfigError("--virtual writes no shard: --shard-index and --finalize do not apply")
        data = write_virtual(cfg.cohort, out, num_shards=a.num_shards, force=a.force)
        print(f"manifest: {out / 'manifest.json'} (virtual: {data['n_subjects']} subjects made when read, no shard)")
        return 0
    return _write(cfg.cohort, out, a)


def _ingest(a) -> int:
    from trd_hpc.errors import ConfigError, IngestError
    from trd_hpc.ingest import report
    from trd_hpc.ingest.resolve import Problems, resolve

    if not a.check and not a.out:
        raise ConfigError("ingest needs --out COHORT_DIR (or --check to only look for problems)")
    problems = Problems()
    cfg = resolve(a.spec, problems)
    if a.report:  # asked for: written whatever the outcome
        js, html = report.write(report.build(Path(a.spec), problems, cfg), Path(a.report))
        print(f"report: {html} ({js.name} beside it)")
    if len(problems.items) == 1:
        raise problems.error(a.spec)
    if problems.items:  # one line each, then the count
        for k, msg in enumerate(problems.items, 1):
            print(f"problem {k}: {msg}", file=sys.stderr)
        raise IngestError(f"{a.spec}: {len(problems.items)} problems (listed above); fix them and run it again")
    n, dropped = cfg.resolved.n_subjects, len(cfg.resolved.dropped)
    # the result of the checks, not progress: printed with --quiet too
    print(f"{a.spec}: {n} subjects" + (f", {dropped} dropped (listed in the manifest)" if dropped else ""))
    if a.check:
        print("check: no problem found (nothing written)" if not a.report else "check: no problem found")
        return 0
    from trd_hpc.ingest.prepare import harmonized

    cfg = harmonized(cfg, Path(a.out), progress=not a.quiet, force=a.force)  # ComBat: fitted before any shard
    rc = _write(cfg, Path(a.out), a)
    if rc == 0:
        report.write(report.build(Path(a.spec), problems, cfg), Path(a.out))
    return rc


def _example_data(a) -> int:
    from trd_hpc.config import ingest_spec_class, ingest_tasks
    from trd_hpc.errors import ConfigError
    from trd_hpc.ingest.mapping import mapping_of

    def examples_of(task: str) -> dict:
        cls = ingest_spec_class(task)
        return mapping_of(cls.model_construct(task=task)).examples if cls is not None else {}

    examples = examples_of(a.task)
    if not examples:
        have = [t for t in ingest_tasks() if examples_of(t)]
        raise ConfigError(f"--task {a.task}: no example folder for that task; tasks with one: {', '.join(have)}")
    layout = a.layout or next(iter(examples))
    if layout not in examples:
        raise ConfigError(f"--layout {layout}: task {a.task} has the example layouts {', '.join(examples)}")
    out = Path(a.dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; example-data writes into a new or empty directory")
    spec = examples[layout](out, a.subjects)
    print(f"{spec}  (ingest it: trd-hpc ingest {spec} --out COHORT_DIR)")
    return 0


def _write(cohort, out: Path, a) -> int:
    """Write (or complete) a cohort's shards and manifest; the shared body of generate and ingest."""
    from trd_hpc.data.generate import generate

    res = generate(
        cohort,
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
        parts.append(
            f"remade {len(res.remade)} (" + "; ".join(f"{k}: {v}" for k, v in sorted(res.remade.items())) + ")"
        )
    if res.kept:
        parts.append(f"kept {len(res.kept)} verified")
    rate = (
        f", {res.subjects_written / res.seconds:.1f} subjects/s, {res.bytes_written / res.seconds / 1e6:.0f} MB/s"
        if res.subjects_written
        else ""
    )
    print(f"shards: {', '.join(parts) or 'none to do'} in {res.seconds:.1f} s{rate}")
    if res.finalized:
        print(f"manifest: {out / 'manifest.json'}")
    else:
        print("manifest not written yet: other shards are still missing (run with --finalize when all are done)")
    return 0


def _cohort_validate(a) -> int:
    from trd_hpc.data.validate import validate_cohort_dir

    problems = validate_cohort_dir(a.dir, deep=not a.quick, progress=not a.quiet)
    for p in problems:
        print(f"BAD {p}", file=sys.stderr)
    if problems:
        print(f"{a.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{a.dir}: OK")
    return 0


def _cohort_info(a) -> int:
    from trd_hpc.data.validate import cohort_summary

    print(cohort_summary(a.dir))
    return 0


def _config_show(a) -> int:
    from trd_hpc.config import load_config, to_yaml

    print(to_yaml(load_config(a.config, a.overrides)), end="")
    return 0


def _config_list(a) -> int:
    from trd_hpc import resources

    for what, table, example in (
        ("configs", resources.configs(), "`trd-hpc config show emt_tiny`, `trd-hpc train emt_tiny`"),
        ("sweeps", resources.sweeps(), "`trd-hpc tune cnn3d_asha --out DIR`"),
    ):
        print(f"{what} (by name: {example}):")
        for name, path in table.items():
            print(f"  {name:<20} {path}")
    print(f"deepspeed (train.deepspeed_config=NAME): {', '.join(resources.deepspeed_configs())}")
    return 0


def _add_ingest(sub) -> None:
    ig = verb(
        sub,
        "ingest",
        _ingest,
        help="turn NIfTI images, PLINK genotypes and a participants table into a sharded cohort",
        description="Read the ingest spec SPEC (YAML; its paths are relative to its own folder), check every "
        "source it names, and write the cohort as `generate` does: shards under temporary names, checksums "
        "in manifest.json, a rerun keeps good shards, one shard per SLURM array task (slurm/ingest.sh).\n"
        "Then: trd-hpc cohort validate DIR; trd-hpc train configs/emt_tiny.yaml --out RUN data.cohort=DIR",
        epilog="Spec keys: see README, 'Your own data'.",
    )
    ig.add_argument("spec", help="ingest spec (YAML): task, table, id_column, label_column, fmri/volume, ...")
    ig.add_argument("--out", help="cohort directory (ingest_report.html/.json are written there too)")
    ig.add_argument(
        "--check",
        action="store_true",
        help="only look for problems: every one in one pass, exit 1 if any; writes nothing unless --report",
    )
    ig.add_argument(
        "--report", metavar="DIR", help="write ingest_report.html/.json into DIR (with --check, or besides)"
    )
    ig.add_argument("--num-shards", type=int, help="number of shards (default: subjects / subjects_per_shard)")
    ig.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    ig.add_argument("--shard-index", type=int, help="write only this shard (one SLURM array task)")
    ig.add_argument("--finalize", action="store_true", help="only write the manifest (all shards must exist)")
    ig.add_argument("--no-verify", action="store_true", help="keep existing shards without re-reading their checksums")
    ig.add_argument("--force", action="store_true", help="write over a directory holding another cohort")
    ig.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parsers(sub) -> None:
    g = verb(
        sub,
        "generate",
        _generate,
        help="write a synthetic cohort as sharded HDF5 plus manifest.json",
        description="Write the cohort of CONFIG's `cohort` section. Re-running keeps shards that verify and "
        "remakes missing or corrupt ones; the manifest is written when every shard is present.",
        epilog=EPILOG,
    )
    g.add_argument(
        "config",
        help="experiment YAML (configs/emt.yaml, ...) or a packaged config by name (emt, cnn3d_tiny: `trd-hpc config list`)",
    )
    g.add_argument("--out", help="cohort directory (default: the config's data.cohort)")
    g.add_argument("--num-shards", type=int, help="number of shards (default: n_subjects / cohort.subjects_per_shard)")
    g.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    g.add_argument("--shard-index", type=int, help="write only this shard (one SLURM array task)")
    g.add_argument("--finalize", action="store_true", help="only write the manifest (all shards must exist)")
    g.add_argument(
        "--virtual",
        action="store_true",
        help="write only the manifest and splits: the loader regenerates each subject from (seed, i) when read",
    )
    g.add_argument("--no-verify", action="store_true", help="keep existing shards without re-reading their checksums")
    g.add_argument(
        "--force",
        action="store_true",
        help="write into a directory that holds other files or another cohort (replacing that cohort); "
        "without it such a directory is refused untouched",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overrides(g)

    _add_ingest(sub)

    ex = verb(
        sub,
        "example-data",
        _example_data,
        help="write a small BIDS-like folder + spec to try ingest on (nibabel's and bed-reader's example files)",
        description="Lay out DIR as a research group's data would be: sub-<id>/func|anat NIfTI images (copies of "
        "the example images nibabel ships), a PLINK fileset (bed-reader's), participants.tsv/.csv with a "
        "missing value or two, and spec.yaml. The labels are made up.",
    )
    ex.add_argument("dir", help="new or empty directory")
    ex.add_argument(
        "--task",
        default="emt",
        help="which paper's layout: emt (default) or cnn3d, or a task of your own with an example",
    )
    ex.add_argument(
        "--layout",
        default=None,
        help="bids (default): raw images by path template; fmriprep (emt): a derivatives folder as fMRIPrep writes "
        "it, with confounds, made from nilearn's MNI152 template",
    )
    ex.add_argument("--subjects", type=int, default=24, help="number of subjects (default 24; emt: at most 100)")

    c = sub.add_parser("cohort", help="inspect a cohort directory")
    csub = c.add_subparsers(dest="cohort_cmd", required=True, metavar="ACTION")
    v = verb(csub, "validate", _cohort_validate, help="check files against the manifest; exit 1 naming each bad file")
    v.add_argument("dir", help="cohort directory (holding manifest.json)")
    v.add_argument(
        "--quick",
        action="store_true",
        help="structure, sizes, shapes, attributes, ids and labels only; no voxel is read (no content checksums)",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    i = verb(csub, "info", _cohort_info, help="print a summary of a cohort")
    i.add_argument("dir", help="cohort directory (holding manifest.json)")

    cf = sub.add_parser("config", help="show a resolved config")
    cfsub = cf.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    s = verb(cfsub, "show", _config_show, help="print CONFIG with overrides applied and defaults filled in")
    s.add_argument("config", help="a YAML path, or a packaged config by name (`trd-hpc config list`)")
    verb(cfsub, "list", _config_list, help="the configs and sweep specs shipped in the package, by name")
    add_overrides(s)
