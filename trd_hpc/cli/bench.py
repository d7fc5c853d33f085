"""``trd-hpc bench generate|load|train|gpu|ingest|predict|faults|tune|scale``: each benchmark with its own options."""

from __future__ import annotations

from pathlib import Path

from trd_hpc.cli.common import add_overrides, verb


def _common(p, config_default: str, subjects: bool = True) -> None:
    p.add_argument("--config", default=None, help=f"experiment YAML (default: {config_default})")
    if subjects:
        p.add_argument("--subjects", type=int, default=None, help="subjects to use (default depends on the benchmark)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_overrides(p)


def _generate(a) -> int:
    from trd_hpc.bench.generate import measure

    return measure(a.config, a.overrides, subjects=a.subjects, scratch_dir=a.dir, json_path=a.json)


def _load(a) -> int:
    from trd_hpc.bench.load import measure

    return measure(a.config, a.overrides, subjects=a.subjects, scratch_dir=a.dir, json_path=a.json, virtual=a.virtual)


def _train(a) -> int:
    from trd_hpc.bench.train import measure

    return measure(
        a.config,
        a.overrides,
        subjects=a.subjects,
        scratch_dir=a.dir,
        json_path=a.json,
        epochs=a.epochs,
        lightning=not a.no_lightning,
        compile=not a.no_compile,
    )


def _gpu(a) -> int:
    from trd_hpc.bench.gpu import measure

    return measure(a.device, a.json, scratch_dir=a.dir)


def _faults(a) -> int:
    from trd_hpc.bench.faults import measure

    return measure(
        a.config, a.overrides, kills=a.kills, seed=a.seed, nproc=a.nproc, scratch_dir=a.dir, json_path=a.json
    )


def _ingest(a) -> int:
    from trd_hpc.bench.ingest import measure

    return measure(
        a.spec, subjects=a.subjects, workers=a.workers, scratch_dir=a.dir, json_path=a.json,
        index_subjects=a.index_subjects, folder=a.folder,
    )  # fmt: skip


def _predict(a) -> int:
    from trd_hpc.bench.predict import measure

    return measure(a.run, a.config, a.overrides, subjects=a.subjects, scratch_dir=a.dir, json_path=a.json)


def _scale(a) -> int:
    from trd_hpc.bench.scale import measure

    return measure(
        a.config,
        a.overrides,
        subjects=a.subjects,
        scratch_dir=a.dir,
        json_path=a.json,
        steps=a.steps,
        workers=a.workers,
        keep=a.keep,
    )


def _tune(a) -> int:
    from trd_hpc.tune.bench import DEFAULT_OUT, format_bench, run_bench
    from trd_hpc.tune.spec import dumps

    res = run_bench(
        a.spec_grid,
        a.spec_asha,
        a.out or DEFAULT_OUT,
        base=a.base,
        address=a.address,
        overrides=tuple(a.overrides or ()),
        max_t=a.max_t,
        seeds=a.seeds,
        val_subjects=a.val_subjects,
    )
    print(format_bench(res))
    print(f"figures: {Path(res['out']) / 'bench_tune.json'}")
    if a.json:
        from trd_hpc.fsio import atomic_write_text

        atomic_write_text(a.json, dumps(res) + "\n")
    return 0


def _add_generate(bsub) -> None:
    _common(
        verb(bsub, "generate", _generate, help="cohort writing: subjects/s and MB/s against raw disk writes"),
        "configs/emt.yaml with 64 subjects",
    )


def _add_scale(bsub) -> None:
    sc = verb(
        bsub,
        "scale",
        _scale,
        help="a 100,000-volume cohort written with N workers and trained on, against the paper-size one",
        description="Generate a cohort of --subjects (default 100,000 volumes of the 3-D CNN config: ~26 GB) with "
        "--workers processes, then train --steps steps on it and on the paper-size cohort, each in a fresh process; "
        "report subjects/s against one worker, samples/s and peak RSS against the paper-size run. Needs the disk "
        "space it prints first; deletes the cohorts afterwards.",
    )
    _common(sc, "configs/cnn3d.yaml, 100000 subjects")
    sc.add_argument("--steps", type=int, default=2000, help="optimiser steps on each cohort (default 2000)")
    sc.add_argument("--workers", type=int, default=2, help="generation processes (default 2)")
    sc.add_argument("--keep", action="store_true", help="with --dir: keep the cohorts")


def _add_load(bsub) -> None:
    ld = verb(bsub, "load", _load, help="Dataset + DataLoader against raw reads, cold and warm page cache")
    _common(ld, "configs/emt.yaml with 48 subjects")
    ld.add_argument(
        "--virtual",
        action="store_true",
        help="also read the cohort as a virtual one (subjects regenerated in the loader) at 0, 1, 2 workers",
    )


def _add_train(bsub) -> None:
    bt = verb(
        bsub,
        "train",
        _train,
        help="the Trainer against a bare training loop and Lightning on the same batches",
        description="Train the same model from the same weights on the same subjects with the trd-hpc Trainer, "
        "a bare PyTorch loop, Lightning's Trainer (with the bench extra: pip install 'trd-hpc[bench]') and the "
        "bare loop under torch.compile; report samples/s, ours/bare (target >= 0.95) and ours/Lightning "
        "(target >= 1.0) measured in this one run.",
    )
    _common(bt, "configs/emt.yaml, 8 steps")
    bt.add_argument("--epochs", type=int, default=3, help="timed epochs per loop after one warm-up (default 3)")
    bt.add_argument("--no-lightning", action="store_true", help="skip the Lightning Trainer")
    bt.add_argument("--no-compile", action="store_true", help="skip the torch.compile loop")


def _add_gpu(bsub) -> None:
    g = verb(
        bsub,
        "gpu",
        _gpu,
        help="one device check: precisions, data stall, MFU, DeepSpeed ZeRO-1/2, exact resume, into one JSON",
        description="On one GPU (sized to finish in under 8 minutes), for the EMT and the 3-D CNN at "
        "the papers' shapes (configs/emt.yaml, configs/cnn3d.yaml), measure with the trainer's own training epoch:\n"
        "  * samples/s and peak device memory in bf16 autocast, fp16 autocast with GradScaler and fp32;\n"
        "  * samples/s fed by the trainer's HDF5 loader (a cohort generated in --dir) over samples/s fed one batch\n"
        "    kept on the device: the data stall;\n"
        "  * MFU: achieved FLOP/s over a bf16 matmul measured in the same run at the model's own GEMM shapes\n"
        "    and square (never above 100 %: measured again once, else null);\n"
        "  * exact resume: a run killed after step 3 (TRD_FAULT) and resumed against an uninterrupted one\n"
        "    (CPU: bit-identical; GPU: every weight tensor within 1e-5 of its max |weight|);\n"
        "  * DeepSpeed ZeRO-1 and ZeRO-2 in this process (world size 1): samples/s, or why it cannot run.\n"
        "--device cpu (what CI runs; auto without a GPU) uses the tiny configs, runs bf16/fp16 briefly and says\n"
        "so, and takes a minute or two. The JSON (device, torch/CUDA versions, units, every stage's status,\n"
        "a failed stage's traceback) is rewritten after each stage; a failed stage makes the exit status 1.\n"
        "On a SLURM GPU node: sbatch slurm/bench_gpu.sh, or srun --gres=gpu:1 trd-hpc bench gpu --json gpu.json",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (default): CUDA when PyTorch sees a GPU, else the CPU mode; cuda without a GPU is an error",
    )
    g.add_argument("--json", default="bench_gpu.json", help="the figures' JSON file (default: bench_gpu.json)")
    g.add_argument("--dir", default=None, help="scratch directory, kept (default: a temporary one, removed)")


def _add_ingest(bsub) -> None:
    ig = verb(
        bsub,
        "ingest",
        _ingest,
        help="ingest against reading the same NIfTI files with nibabel alone, 1 and N workers",
        description="Ingest SPEC (default: a folder made in the scratch directory, see --folder) onto paper 000's "
        "48x48x24 grid and 80 frames with 1 and --workers workers, and compare with reading its images with nibabel "
        "alone.",
    )
    ig.add_argument("spec", nargs="?", default=None, help="ingest spec (default: the folder --folder names)")
    ig.add_argument(
        "--folder",
        choices=("fmriprep", "example"),
        default="fmriprep",
        help="fmriprep (default): fMRIPrep derivatives at 3 mm MNI (65x77x63, 80 frames, mask and confounds "
        "regressed), the size of a real preprocessed series; example: `trd-hpc example-data`'s folder of "
        "nibabel's small images (at most 128x96x24x2), upsampled onto a grid larger than they are",
    )
    ig.add_argument("--subjects", type=int, default=12, help="subjects of the made folder (default 12, at most 100)")
    ig.add_argument("--workers", type=int, default=2, help="workers of the second ingest (default 2)")
    ig.add_argument(
        "--index-subjects",
        type=int,
        default=0,
        help="also time ingest's index (table, file listing, every header, splits) of this many subjects, "
        "symbolic links to nibabel's example images, against reading their headers alone (e.g. 40000)",
    )
    ig.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed)")
    ig.add_argument("--json", default=None, help="also write the figures to this JSON file")


def _add_predict(bsub) -> None:
    pr = verb(
        bsub,
        "predict",
        _predict,
        help="trd-hpc predict against the model's bare forward on in-memory batches; memory vs cohort size",
        description="Predict a synthetic cohort of 10 x --subjects with RUN's model (default: --config's model "
        "trained for one epoch on --subjects subjects in the scratch directory) and compare with the bare forward "
        "pass over the same batches; peak RSS for --subjects and 10x as many.  The tiny EMT's forward is so cheap "
        "that reading dominates; --config configs/emt.yaml --subjects 16 measures at the paper's shapes.",
    )
    pr.add_argument(
        "run", nargs="?", default=None, help="run directory or bundle (default: --config's model, trained here)"
    )
    pr.add_argument("--subjects", type=int, default=64, help="the small cohort (the large one is 10x; default 64)")
    pr.add_argument(
        "--config", default=None, help="experiment YAML of the model trained here (default: configs/emt_tiny.yaml)"
    )
    pr.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed)")
    pr.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_overrides(pr)


def _add_faults(bsub) -> None:
    f = verb(
        bsub,
        "faults",
        _faults,
        help="SIGKILL a run at random moments, resume, compare with an uninterrupted run",
        description="Train once uninterrupted, then again with SIGKILLs at random moments (resumed each "
        "time); the two must end with the same weights bit for bit and the same metrics.",
    )
    f.add_argument("--kills", type=int, default=20, help="SIGKILLs to make (default 20)")
    f.add_argument("--seed", type=int, default=0, help="seed of the kill delays (printed; default 0)")
    f.add_argument("--nproc", type=int, default=1, help="processes per run (>1: torchrun + DDP; default 1)")
    _common(f, "configs/emt_tiny.yaml", subjects=False)


def _add_tune(bsub) -> None:
    from trd_hpc.tune.bench import DEFAULT_ASHA, DEFAULT_GRID, DEFAULT_OUT, VAL_SUBJECTS

    t = verb(
        bsub,
        "tune",
        _tune,
        help="the paper's grid (fifo) against ASHA on the same trial budget",
        description="Run the paper's grid under fifo and ASHA with as many trials, and compare the best "
        "value found and the trial-epochs spent.",
    )
    t.add_argument("--spec-grid", default=DEFAULT_GRID, help=f"the grid spec, run under fifo (default {DEFAULT_GRID})")
    t.add_argument(
        "--spec-asha", default=DEFAULT_ASHA, help=f"the ASHA spec, as many trials as the grid (default {DEFAULT_ASHA})"
    )
    t.add_argument(
        "--base",
        "--config",
        dest="base",
        default=None,
        help="training config for both sweeps instead of the specs' base (e.g. configs/cnn3d_tiny.yaml)",
    )
    t.add_argument("--address", default=None, help="Ray cluster ('auto'); default: a local one")
    t.add_argument("--max-t", type=int, default=None, help="epochs per trial for both (default: the grid spec's max_t)")
    t.add_argument("--seeds", type=int, default=3, help="ASHA sweeps, one per search seed (default 3)")
    t.add_argument(
        "--val-subjects",
        type=int,
        default=VAL_SUBJECTS,
        help=f"validation subjects of the bench cohort, training subjects kept (default {VAL_SUBJECTS}; 0: the "
        "base config's split as it is)",
    )
    t.add_argument(
        "--out",
        "--dir",
        dest="out",
        default=None,
        help=f"directory of the two sweeps and bench_tune.json (default {DEFAULT_OUT})",
    )
    t.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_overrides(t, "dotted overrides of the base config")


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="measure throughput against this machine's limits")
    bsub = b.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    # The order here is the order `trd-hpc bench --help` lists the benchmarks in.
    for add in (
        _add_generate, _add_scale, _add_load, _add_train, _add_gpu, _add_ingest, _add_predict, _add_faults, _add_tune,
    ):  # fmt: skip
        add(bsub)
