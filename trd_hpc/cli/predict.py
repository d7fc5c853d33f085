"""``trd-hpc predict`` and ``trd-hpc export``: a trained model applied to a cohort, or exported."""

from __future__ import annotations

from trd_hpc.cli.common import verb


def _predict(a) -> int:
    from trd_hpc.predict import SPLITS_HELP, merge_parts, predict  # noqa: F401

    if a.finalize:
        path = merge_parts(a.out)
        print(f"predictions: {path}")
        return 0
    if a.bids:
        return _predict_folder(a)
    if not a.model or not a.cohort:
        from trd_hpc.errors import ConfigError

        raise ConfigError("predict MODEL --cohort DIR: both are required (the model, and the subjects to predict)")
    res = predict(
        a.model,
        a.cohort,
        out=a.out,
        split=a.split,
        batch_size=a.batch_size,
        shard_index=a.shard_index,
        num_shards=a.num_shards,
        progress=not a.quiet,
        device=a.device,
        explain=a.explain,
        explain_subjects=[x for x in (a.subjects or "").split(",") if x] or None,
        explain_dir=a.explain_dir,
    )
    cal = f", calibrated with {res.calibrator}" if res.calibrator else ""
    if res.merged:
        print(f"predictions: {res.out} ({res.rows} subjects{cal})" if res.rows else f"predictions: {res.out}")
    else:
        print(f"part written: {res.parts[0]} ({res.rows} subjects{cal}); merge with --finalize once all are done")
    if res.explained:
        maps = any(p.name.endswith(".nii.gz") for p in res.explained.parent.iterdir())
        print(f"explanations: {res.explained}" + (" (maps as NIfTI beside it)" if maps else " (scores per region)"))
    print(f"model: bundle sha256 {res.bundle_sha256} (compare with the one its author published)")
    return 0


def _predict_folder(a) -> int:
    from trd_hpc.errors import ConfigError
    from trd_hpc.predict_folder import predict_folder

    if a.cohort or not a.model:
        raise ConfigError("predict MODEL --bids DIR: a model, and the folder instead of --cohort")
    out = None if a.out == "predictions.csv" else a.out  # the default: DIR/derivatives/trd-hpc/
    res = predict_folder(a.model, a.bids, out=out, labels=a.participant_label, progress=not a.quiet, device=a.device)
    print(f"predictions: {res['out']} ({res['rows']} subjects; {res['sidecar'].name} beside it)")
    print(f"model: bundle sha256 {res['bundle_sha256']} (compare with the one its author published)")
    return 0


def _export(a) -> int:
    from trd_hpc.export import export_model

    res = export_model(a.model, a.format, a.out)
    print(
        f"exported: {res['out']} ({res['format']}; outputs equal PyTorch's within {res['max_abs_diff']:.2g}, "
        f"tolerance {res['tolerance']:g})"
    )
    return 0


def add_parsers(sub) -> None:
    e = verb(
        sub,
        "export",
        _export,
        help="export a run's model as TorchScript, ONNX or a torch.export program (loads without trd-hpc)",
        description="Export the network of MODEL's bundle with the batch size left free, then check the export "
        "against PyTorch on another batch (max |difference| <= 1e-4). Load it with torch.jit.load, "
        "torch.export.load(...).module() or onnxruntime.InferenceSession (see README, 'Using a trained model').",
    )
    e.add_argument("model", help="run directory (its bundle/) or bundle folder")
    e.add_argument(
        "--format",
        required=True,
        choices=["torchscript", "onnx", "pt2"],
        help="torchscript (torch.jit), onnx (checked with onnxruntime), pt2 (torch.export)",
    )
    e.add_argument("--out", required=True, help="output file")

    p = verb(
        sub,
        "predict",
        _predict,
        help="apply a trained model (a run directory or its bundle/) to a cohort's subjects",
        description="Predict every subject of --cohort's --split with the model of MODEL (a run directory or a "
        "bundle folder): per-subject probabilities (calibrated too, for the EMT), the predicted label or class "
        "and, for the 3-D CNN, the severity on its original scale. The cohort is checked against the model's "
        "schema first and prepared as the training cohort was. Under torchrun each rank predicts a slice; as a "
        "SLURM array, --shard-index K --num-shards N per task, then --finalize merges the parts.",
    )
    p.add_argument("model", nargs="?", help="run directory (its bundle/) or bundle folder (not with --finalize)")
    p.add_argument("--cohort", help="cohort directory (synthetic or ingested; labels not needed)")
    p.add_argument(
        "--bids",
        metavar="DIR",
        help="instead of --cohort: a study folder laid out as the training study was (table, images or "
        "derivatives, genotypes); prepared as the model's bundle says, no ingest needed; writes "
        "DIR/derivatives/trd-hpc/participants_predictions.tsv (or --out FILE.tsv) and a JSON sidecar",
    )
    p.add_argument(
        "--participant-label", nargs="+", metavar="LABEL", help="with --bids: only these subjects (01 02 ...)"
    )
    p.add_argument("--split", default="test", help="subjects to predict: test (default) | val | train | all | fold:K")
    p.add_argument("--out", default="predictions.csv", help="output file, .csv (default predictions.csv) or .parquet")
    p.add_argument("--batch-size", type=int, default=None, help="subjects per batch (default: the run's batch size)")
    p.add_argument("--shard-index", type=int, default=None, help="this array task's part (with --num-shards)")
    p.add_argument("--num-shards", type=int, default=None, help="number of parts (array tasks)")
    p.add_argument("--finalize", action="store_true", help="merge the parts of --out in subject order")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: a GPU if there is one")
    p.add_argument(
        "--explain",
        action="store_true",
        help="also write per-subject attribution maps as NIfTI (EMT: Integrated Gradients per modality; CNN: "
        "Grad-CAM per head) and a summary row each (top regions, SNPs, clinical variables)",
    )
    p.add_argument(
        "--subjects", default=None, help="--explain only these (subject ids or participant ids, comma-separated)"
    )
    p.add_argument("--explain-dir", default=None, help="where the maps go (default: beside --out, OUT_explanations/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
