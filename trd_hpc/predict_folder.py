"""``trd-hpc predict MODEL --bids DIR``: predict new subjects straight from a study folder.

The folder is laid out as the training study was (the same table, image templates or
derivatives folder, genotype prefix, relative to DIR).  The model's bundle carries what its
ingest did: the training spec's settings in its cohort config (grid, frames, confounds,
atlas settings, the variants, the clinical columns), the atlas files themselves, the training
split's clinical statistics.  From those a spec for DIR is made in a scratch folder (the
subjects unlabelled, the model's variant ids, the bundle's atlas, DIR linked in, never
written to), ingested with the same code as ``trd-hpc ingest``, and predicted with the
same code as ``trd-hpc predict --cohort`` - so the probabilities are those of ingest +
predict, by construction and by test.

Writes BIDS-derivatives-style outputs: ``participants_predictions.tsv`` and a JSON sidecar
naming the bundle, its sha256 and the calibrator (default: ``DIR/derivatives/trd-hpc/``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from trd_hpc.errors import ConfigError, IngestError

STUDY = "study"  # the link to DIR inside the scratch folder


def _spec_for(b, folder: Path, work: Path, labels: list[str] | None) -> Path:
    """The ingest spec of ``folder``'s subjects as the model's training cohort was ingested."""
    from trd_hpc.config import ingest_spec_class
    from trd_hpc.ingest import table as T
    from trd_hpc.ingest.mapping import mapping_of

    co = b.cfg.cohort
    cls = ingest_spec_class(getattr(co, "task", ""))
    if getattr(co, "resolved", None) is None or cls is None:
        raise ConfigError(
            f"{b.path}: the model was trained on a synthetic cohort (kind {co.kind}): there is no study layout to "
            "read a folder by; ingest the subjects with a spec and use predict --cohort"
        )
    m = mapping_of(co)
    d = {f: getattr(co, f) for f in cls.model_fields}
    d = json.loads(json.dumps(cls.model_validate(d).model_dump(mode="json")))
    for key in ("label_column", "response_column", "severity_column", "labels", "site_column"):
        if key in d:
            d[key] = None
    d["group_columns"] = []
    (work / STUDY).symlink_to(folder.resolve(), target_is_directory=True)
    # the table: DIR's, the chosen participants only
    tpath = folder / co.table
    table = T.read_table(tpath)
    ids = T.column(table, tpath, co.id_column, "id_column")
    if labels:
        keys = ids.astype(str).map(T.subject_key)
        unknown = sorted(set(labels) - set(keys))
        if unknown:
            raise IngestError(f"--participant-label: {', '.join(unknown)} not in {folder / co.table}")
        table = table[keys.isin(labels)]
    sep = "\t" if str(co.table).lower().endswith(".tsv") else ","
    table.to_csv(work / Path(co.table).name, sep=sep, index=False, na_rep="n/a")
    d["table"] = Path(co.table).name
    how = d[m.image.key]
    if isinstance(how, str):
        d[m.image.key] = f"{STUDY}/{how}"
    else:
        how["derivatives"] = f"{STUDY}/{how['derivatives']}"
    for src in m.cohort_sources:
        if d.get(src.key) is not None:  # a source the model was trained without (no genotypes) stays absent
            d[src.key] = f"{STUDY}/{d[src.key]}"
    if d.get("genotypes") is None:  # trained without genotypes: nothing to select
        d.pop("snps", None)
    elif "snps" in d:  # the model's variants, in its order; QC was the training cohort's business
        (work / "snps.txt").write_text("\n".join(co.snp_ids) + "\n")
        d["snps"] = {"ids": "snps.txt"}
    if d.get("atlas"):
        d["atlas"] = _atlas_from_bundle(b, work)
    if d.get("harmonize"):  # the training split's ComBat estimates, applied (never refitted)
        from trd_hpc.bundle import _verified_bytes
        from trd_hpc.ingest.harmonize import FILE

        (work / FILE).write_bytes(_verified_bytes(b.path, FILE, b.meta))
        d["harmonize"]["estimates"] = FILE
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    return spec


def _atlas_from_bundle(b, work: Path) -> dict:
    names = [n for n in ("atlas.nii.gz", "atlas.nii") if (b.path / n).is_file()]
    if not names:
        raise IngestError(
            f"{b.path}: the model reads atlas regions but its bundle holds no atlas (written before them?)"
        )
    (work / "atlas").mkdir()
    shutil.copyfile(b.path / names[0], work / "atlas" / names[0])
    out = {"image": f"atlas/{names[0]}"}
    if (b.path / "atlas_labels.tsv").is_file():
        shutil.copyfile(b.path / "atlas_labels.tsv", work / "atlas" / "labels.tsv")
        out["labels"] = "atlas/labels.tsv"
    return out


def predict_folder(
    model: str | Path,
    folder: str | Path,
    out: str | Path | None = None,
    labels: list[str] | None = None,
    progress: bool = True,
    device: str = "auto",
) -> dict:
    """Predict the subjects of study folder ``folder``; returns what was written."""
    from trd_hpc.bundle import load_bundle
    from trd_hpc.data.generate import generate
    from trd_hpc.fsio import atomic_write_json, atomic_write_text
    from trd_hpc.ingest.prepare import harmonized
    from trd_hpc.ingest.resolve import resolve
    from trd_hpc.predict import predict

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--bids {folder}: not a folder")
    b = load_bundle(model)
    dest = Path(out) if out is not None else folder / "derivatives" / "trd-hpc" / "participants_predictions.tsv"
    if dest.suffix.lower() != ".tsv":
        raise ConfigError(f"--out {dest}: predictions from a folder are written as a BIDS .tsv")
    with tempfile.TemporaryDirectory(prefix="trd-predict-folder-") as tmp:
        work = Path(tmp)
        spec = _spec_for(b, folder, work, labels)
        cfg = harmonized(resolve(spec), work / "cohort", progress=False)
        generate(cfg, work / "cohort", progress=False)
        res = predict(b.path, work / "cohort", out=work / "predictions.csv", progress=progress, device=device)
        import pandas as pd

        df = pd.read_csv(res.out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, df.to_csv(sep="\t", index=False, na_rep="n/a"))
    sidecar = dest.with_suffix(".json")
    from trd_hpc import __version__

    record = {
        "Description": "trd-hpc predictions of this folder's subjects",
        "GeneratedBy": [{"Name": "trd-hpc", "Version": __version__}],
        "bundle": str(b.path),
        "bundle_sha256": res.bundle_sha256,
        "calibrator": res.calibrator,
        "subjects": int(len(df)),
        "dropped": cfg.resolved.dropped,
        "columns": list(df.columns),
    }
    atomic_write_json(sidecar, record, indent=1)
    return {"out": dest, "sidecar": sidecar, "rows": int(len(df)), "bundle_sha256": res.bundle_sha256}
