"""A trained model that travels: ``RUN_DIR/bundle/``, enough to predict without the run
or its training cohort.

    bundle.json        format name and version, task, model, and the sha256 of every file
                       below: a loader reads no file that is not listed or whose bytes differ
    config.yaml        the run's resolved config (the cohort section included)
    model.pt           the best weights (a state_dict; loaded with weights_only=True)
    calibrators.json   binary tasks: every fitted calibrator (Platt, isotonic, temperature)
                       and the default one (``eval.default_calibrator``; auto = lowest
                       out-of-fold validation ECE)
    preprocessing.json what the loader did to the inputs: volume normalisation, the
                       clinical standardisation, SNP ids and genotype coding, grid
    schema.json        the input columns (name, per-subject shape, dtype) a cohort must hold
    metrics.json       the run's final metrics
    model_card.md/json task, training data (cohort fingerprint), splits, metrics with
                       bootstrap 95 % intervals, calibration, intended use, limitations

Written at the end of every evaluation (``trd-hpc train``, ``trd-hpc evaluate``), into a
temporary folder renamed into place, so a reader sees a whole bundle or the previous one.
A loader that does not know a bundle's format version refuses it.

A bundle is a file someone hands you: nothing in it runs (weights load with
``weights_only=True``, YAML with ``safe_load``), and every byte read is checked against the
manifest, so a ``model.pt`` of another run swapped in, a file changed after writing, or a
calibrators file left off the list is refused by name.  The hashes catch mixing and damage;
against a deliberate forgery compare :func:`bundle_digest` (``trd-hpc predict`` prints it)
with the one the bundle's author published.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trd_hpc.errors import RunDirError
from trd_hpc.fsio import HOST, atomic_write_json, atomic_write_text, temp_name

FORMAT = "trd-hpc-bundle"
VERSION = 2  # 2: bundle.json "files" maps each file to its sha256
DIR = "bundle"


class BundleError(RunDirError):
    """A bundle is missing, damaged, or of a format this version does not read."""


@dataclass
class Bundle:
    path: Path
    meta: dict
    cfg: Any
    calibrators: dict
    preprocessing: dict
    schema: dict
    metrics: dict
    # sha256 of the bundle.json bytes this Bundle was read from (which pin every other file):
    # taken at load, so it names what was used even if the folder changes afterwards
    digest: str = ""

    @property
    def task(self) -> str:
        return self.cfg.task

    def default_calibrator(self) -> dict | None:
        name = self.calibrators.get("default")
        return self.calibrators.get("fitted", {}).get(name) if name else None

    def build_model(self):
        """The network with the bundle's weights (verified against bundle.json), in eval mode."""
        import io

        import torch

        from trd_hpc.tasks import make_task

        model = make_task(self.cfg).build_model()
        path = self.path / "model.pt"
        data = _verified_bytes(self.path, "model.pt", self.meta)  # the very bytes loaded below
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # weights of another model, a pickle that is not a state_dict
            raise BundleError(
                f"{path}: cannot be loaded into the model of {self.path / 'config.yaml'} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        return model.eval()


# ---------------------------------------------------------------- writing
def shareable_config(cfg):
    """The run's config as a bundle carries it: nothing of the study beyond what the model
    needs and the card states.  A bundle is shared with others; the run's own config.yaml
    keeps the full record.  Left out: the dropped participants' ids and reasons (their
    count stays), the study's folder and the training cohort's location (its name stays)."""
    from trd_hpc.config import derive

    changes: dict = {"data.cohort": Path(str(cfg.data.cohort)).name}
    if getattr(cfg.cohort, "resolved", None) is not None:
        changes.update({"cohort.resolved.root": "", "cohort.resolved.dropped": []})
        if cfg.cohort.resolved.harmonization is not None:  # the bundle's own copy
            changes["cohort.resolved.harmonization.file"] = "harmonization.npz"
    return derive(cfg, changes, "the bundle's shareable config")


def shareable_metrics(metrics: dict) -> dict:
    """metrics.json without the cohort's absolute path or the study folder (see shareable_config)."""
    out = dict(metrics)
    ident = out.get("cohort")
    if isinstance(ident, dict):
        ident = {k: v for k, v in ident.items() if k != "spec_folder"}
        if "path" in ident:
            ident["path"] = Path(str(ident["path"])).name
        out["cohort"] = ident
    return out


def _schema(cfg) -> dict:
    from trd_hpc.data.kinds import kind_of
    from trd_hpc.data.manifest import class_names
    from trd_hpc.tasks import make_task

    co = cfg.cohort
    task = make_task(cfg)
    cols = {c.name: c for c in kind_of(co).schema(co)}
    out = {
        "inputs": [
            {
                "name": n,
                "shape": list(cols[n].shape),
                "dtype": cols[n].dtype,
                **({"high": cols[n].high} if cols[n].high is not None else {}),
            }
            for n in task.input_names
            if n in cols
        ],
        "class_names": class_names(co),
    }
    if hasattr(co, "clinical_names") and hasattr(co, "n_snps"):
        out.update(
            {
                "clinical_names": list(co.clinical_names),
                "n_snps": co.n_snps,
                "genotype_values": co.genotype_values,
                "snp_ids": list(getattr(co, "snp_ids", None) or []),
            }
        )
    return out


def _preprocessing(cfg) -> dict:
    """What the loader does to each input, by what the cohort has (any task's)."""
    co = cfg.cohort
    out: dict = {"cohort_kind": co.kind, "cohort": json.loads(json.dumps(co.model_dump(mode="json")))}
    if hasattr(co, "clinical_names"):
        mean, sd = getattr(co, "clinical_mean", None), getattr(co, "clinical_sd", None)
        out["clinical"] = (
            {"names": list(co.clinical_names), "mean": mean, "sd": sd, "missing": "the mean (0 after standardising)"}
            if mean is not None
            else {"names": list(co.clinical_names), "standardised": False}
        )
    if hasattr(co, "genotype_values"):
        out["genotypes"] = {
            "coding": "copies of the A1 allele 0/1/2" + ("; 3 = missing call" if co.genotype_values == 4 else ""),
            "values": co.genotype_values,
        }
    if hasattr(co, "fmri_shape"):
        out["fmri_shape"] = list(co.fmri_shape)
    if hasattr(co, "severity_max"):
        out["volume"] = {
            "shape": list(co.shape),
            "normalize": bool(cfg.data.normalize_volumes),
            "method": "per volume: z-score, then rescaled to [0, 1]" if cfg.data.normalize_volumes else "none",
        }
        out["severity_max"] = float(co.severity_max)
    rec = getattr(getattr(co, "resolved", None), "harmonization", None)
    if rec is not None:
        out["harmonization"] = {
            "method": "ComBat per voxel before the loader's normalisation (trd_hpc.ingest.harmonize)",
            **co.harmonize.model_dump(mode="json"),
            **rec.model_dump(mode="json"),
        }
    return out


def _calibrators(cfg, run) -> dict:
    """Binary tasks: all three calibrators fitted on the validation predictions, and the default.

    A calibrator flagged as degenerate (eval.calibration.degenerate: a temperature at its
    bound, outputs collapsed onto 0/1, ...) is kept, with the reason, but is never the
    default: the next usable method in order is, or none (the plain sigmoid), and the
    model card says which and why."""
    val = run.predictions("val")
    if "logit" not in val or "label" not in val:  # not a single-logit binary task
        return {}
    from trd_hpc.eval.calibration import calibrator_state, choose_calibrator, degenerate, make_calibrator

    order = ("platt", "isotonic", "temperature")
    fitted, errors, flagged = {}, {}, {}
    for m in order:
        try:
            cal = make_calibrator(m).fit(val["logit"], val["label"])
        except ValueError as e:
            errors[m] = str(e)
            continue
        fitted[m] = calibrator_state(cal)
        why = degenerate(cal, val["logit"])
        if why:
            flagged[m] = why
    usable = [m for m in order if m in fitted and m not in flagged]
    want = cfg.eval.default_calibrator
    scores: dict = {}
    if want == "auto":
        default, scores = choose_calibrator(val["logit"], val["label"], usable, cfg.eval.ece_bins, cfg.train.seed)
        how = "lowest out-of-fold ECE on the validation split" if default else "validation split too small to choose"
        if default is None and usable:
            default, how = usable[0], f"{how}; the first usable of {', '.join(order)}"
    elif want == "none":
        default, how = None, "eval.default_calibrator=none"
    elif want in usable:
        default, how = want, f"eval.default_calibrator={want}"
    else:
        why = flagged.get(want) or errors.get(want) or "not fitted"
        default = usable[0] if usable else None
        how = f"eval.default_calibrator={want} not used ({why}); {default or 'none (the uncalibrated sigmoid)'} instead"
    if default is None and want != "none":
        how += "; no usable calibrator: p_trd_calibrated is the uncalibrated sigmoid"
    return {
        "default": default,
        "chosen_by": how,
        "oof_ece": scores,
        "fitted": fitted,
        "errors": errors,
        "degenerate": flagged,
    }


def _bootstrap_ci(cfg, run, n_boot: int = 1000) -> dict:
    """95 % percentile intervals over test subjects (resampled with replacement) of the task's
    statistics (TaskSpec.bootstrap_statistics); the same draws (metrics.bootstrap_ci, seed 0)
    as report.html's summary."""
    from trd_hpc.eval.metrics import bootstrap_ci, ci_too_small
    from trd_hpc.tasks import spec_for

    hook = spec_for(cfg).bootstrap_statistics
    if hook is None:
        return {}
    stats, arrays = hook(cfg, run.predictions("test"))
    too_small = ci_too_small(len(arrays[0]) if arrays else 0)
    if too_small and stats:
        return {"not_computed": too_small}
    cis = bootstrap_ci(stats, *arrays, n_boot=n_boot, seed=0)
    return {k: list(v) for k, v in cis.items() if v is not None}


def _model_card(cfg, run, metrics: dict, calibrators: dict, ci: dict) -> tuple[dict, str]:
    from trd_hpc.data.kinds import kind_of
    from trd_hpc.data.manifest import load_manifest
    from trd_hpc.data.shards import config_fingerprint
    from trd_hpc.tasks import spec_for

    spec = spec_for(cfg)
    co = cfg.cohort
    generated = kind_of(co).generated
    try:
        m = load_manifest(cfg.data.cohort)
        digest = hashlib.sha256("".join(s["checksum"] for s in m.shards).encode()).hexdigest()[:16]
        splits = {k: len(v) for k, v in m.splits.items()}
    except Exception:  # the training cohort moved: the card still says what the config says
        digest, splits = None, {}
    headline = {k: metrics[k] for k in spec.summary_keys if k in metrics}
    card = {
        "task": cfg.task,
        "title": spec.title,
        "model": cfg.model.name,
        "training_data": {
            "cohort": Path(str(cfg.data.cohort)).name,
            "kind": co.kind,
            "synthetic": generated,
            "n_subjects": int(co.n_subjects),
            "config_fingerprint": config_fingerprint(co),
            "content_digest": digest,
            "splits": splits,
            "fold": cfg.data.fold,
        },
        "metrics": headline,
        "confidence_intervals_95": ci,
        "calibration": {k: calibrators.get(k) for k in ("default", "chosen_by", "oof_ece", "degenerate", "errors")}
        if calibrators
        else None,
        "intended_use": "research on treatment-resistant depression / medication response prediction; "
        "not a medical device and not for clinical decisions",
        "limitations": (
            ["trained on synthetic data generated by trd-hpc: its figures say nothing about real patients"]
            if generated
            else [f"trained on {co.n_subjects} subjects of one ingested cohort; validate on other sites before use"]
        )
        + [
            "inputs must match schema.json (shapes, SNP ids, clinical columns) and be preprocessed as "
            "preprocessing.json says; `trd-hpc predict` checks and applies both"
        ],
    }
    lines = [
        f"# Model card: {spec.title}",
        "",
        f"- **Model**: `{cfg.model.name}` (task `{cfg.task}`), weights in `model.pt`, config in `config.yaml`",
        f"- **Training data**: {'synthetic' if generated else 'ingested'} cohort `{co.kind}`, "
        f"{co.n_subjects} subjects, fingerprint `{card['training_data']['config_fingerprint']}`"
        + (f", content `{digest}`" if digest else ""),
        f"- **Splits**: {', '.join(f'{k} {v}' for k, v in splits.items()) or 'unknown'}",
        "",
        "## Metrics (test split)",
        "",
        "| metric | value | 95 % CI (bootstrap over test subjects) |",
        "|---|---|---|",
    ]
    no_ci = ci.get("not_computed")
    for k, v in headline.items():
        short = k.split(".", 1)[-1]
        iv = None if no_ci else ci.get(short)
        lines.append(
            f"| {k} | {v:.4g} | {f'{iv[0]:.3g} - {iv[1]:.3g}' if iv else (no_ci or '')} |"
            if isinstance(v, float)
            else f"| {k} | {v} | |"
        )
    if calibrators:
        lines += [
            "",
            "## Calibration",
            "",
            f"Default: **{calibrators.get('default')}** ({calibrators.get('chosen_by')}).",
        ]
        if calibrators.get("oof_ece"):
            lines.append(
                "Out-of-fold validation ECE: " + ", ".join(f"{k} {v:.3f}" for k, v in calibrators["oof_ece"].items())
            )
        for k, why in (calibrators.get("degenerate") or {}).items():
            lines.append(f"- **{k} is degenerate, never the default**: {why}.")
        for k, why in (calibrators.get("errors") or {}).items():
            lines.append(f"- {k}: {why}.")
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    return card, "\n".join(lines) + "\n"


def _copy_atlas(cfg, tmp: Path) -> list[str]:
    """An atlas-read cohort's atlas image and labels, copied into the bundle (predicting a new
    subject folder needs them: trd_hpc.predict_folder); refused when changed since ingest."""
    co = cfg.cohort
    atlas = getattr(co, "atlas", None)
    if atlas is None:
        return []
    import hashlib

    root = Path(co.resolved.root)
    image = root / atlas.image
    labels = root / atlas.labels if atlas.labels else None
    h = hashlib.sha256(image.read_bytes())
    if labels is not None:
        h.update(labels.read_bytes())
    if h.hexdigest() != co.atlas_sha256:
        raise RunDirError(f"{image}: the atlas changed since the cohort was ingested; ingest it again")
    name = "atlas.nii.gz" if image.name.endswith(".gz") else "atlas.nii"
    shutil.copyfile(image, tmp / name)
    out = [name]
    if labels is not None:
        shutil.copyfile(labels, tmp / "atlas_labels.tsv")
        out.append("atlas_labels.tsv")
    return out


def _copy_harmonization(cfg, tmp: Path) -> list[str]:
    """A harmonised cohort's ComBat estimates (no subject's data: per-voxel site and covariate
    parameters), copied so new subjects of the fitted sites are corrected alike."""
    rec = getattr(getattr(cfg.cohort, "resolved", None), "harmonization", None)
    if rec is None:
        return []
    from trd_hpc.ingest.harmonize import FILE, content_sha256, read

    if content_sha256(read(Path(rec.file))) != rec.sha256:
        raise RunDirError(f"{rec.file}: the harmonisation estimates changed since the cohort was ingested")
    shutil.copyfile(rec.file, tmp / FILE)
    return [FILE]


def write_bundle(run_dir: str | Path) -> Path:
    """(Re)write ``RUN_DIR/bundle/`` from the finished run; returns its path."""
    from trd_hpc.config import to_yaml
    from trd_hpc.rundir import RunDir

    run = RunDir(run_dir)
    cfg = run.config()
    metrics = run.metrics(required=True)
    if not run.model_file.is_file():
        raise RunDirError(f"{run.model_file} is missing: the run has not finished training")
    final = run.path / DIR
    tmp = temp_name(run.path / DIR)
    tmp.mkdir()  # a fresh random name: fails, rather than follows, anything planted there
    try:
        shutil.copyfile(run.model_file, tmp / "model.pt")
        shared = shareable_config(cfg)
        atomic_write_text(tmp / "config.yaml", to_yaml(shared))
        cal = _calibrators(cfg, run)
        files = [
            "config.yaml",
            "model.pt",
            "preprocessing.json",
            "schema.json",
            "metrics.json",
            "model_card.md",
            "model_card.json",
        ] + (["calibrators.json"] if cal else [])
        if cal:
            atomic_write_json(tmp / "calibrators.json", cal)
        files += _copy_atlas(cfg, tmp) + _copy_harmonization(cfg, tmp)
        atomic_write_json(tmp / "preprocessing.json", _preprocessing(shared))
        atomic_write_json(tmp / "schema.json", _schema(shared))
        atomic_write_json(tmp / "metrics.json", shareable_metrics(metrics))
        card, md = _model_card(cfg, run, metrics, cal, _bootstrap_ci(cfg, run))
        atomic_write_json(tmp / "model_card.json", card)
        atomic_write_text(tmp / "model_card.md", md)
        from trd_hpc import __version__

        atomic_write_json(
            tmp / "bundle.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "task": cfg.task,
                "model": cfg.model.name,
                "written_by": f"trd-hpc {__version__}",
                "files": {f: _sha256((tmp / f).read_bytes()) for f in files},
            },
        )
        # swap in: the old bundle (if any) moves aside first, so no moment has none or half of one
        old = run.path / f".{DIR}.old-{HOST}-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- reading
# Every file a loader reads; each must be listed in bundle.json with its sha256.
REQUIRED = ("config.yaml", "model.pt", "preprocessing.json", "schema.json", "metrics.json")
OPTIONAL = (
    "calibrators.json",
    "model_card.md",
    "model_card.json",
    "atlas.nii.gz",
    "atlas.nii",
    "atlas_labels.tsv",
    "harmonization.npz",
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_digest(path: str | Path) -> str:
    """sha256 of a bundle's bundle.json, which pins every other file: the one value to compare
    with what a bundle's author published."""
    path = Path(path)
    if (path / DIR / "bundle.json").is_file():
        path = path / DIR
    return _sha256((path / "bundle.json").read_bytes())


def _verified_bytes(path: Path, name: str, meta: dict) -> bytes:
    """The bytes of ``path/name``, only if bundle.json lists them with this sha256."""
    p = path / name
    files = meta.get("files") or {}
    if name not in files:
        raise BundleError(
            f"{p}: not listed in {path / 'bundle.json'} (a file added or a listing edited after the bundle "
            "was written): refused"
        )
    if p.is_symlink():
        raise BundleError(f"{p}: a symbolic link; a bundle holds its own files: refused")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{p} is missing: not a complete trd-hpc bundle") from None
    if _sha256(data) != files[name]:
        raise BundleError(
            f"{p}: sha256 {_sha256(data)[:16]}... differs from the {files[name][:16]}... {path / 'bundle.json'} "
            "lists (changed or swapped after the bundle was written): refused"
        )
    return data


def _read(path: Path, name: str, meta: dict) -> Any:
    p = path / name
    data = _verified_bytes(path, name, meta)
    try:
        return json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"{p}: not valid JSON") from None


def _check_listing(path: Path, meta: dict) -> None:
    files = meta.get("files")
    where = path / "bundle.json"
    if not isinstance(files, dict) or not all(isinstance(v, str) and len(v) == 64 for v in files.values()):
        raise BundleError(f"{where}: field 'files' must map each file name to its sha256")
    unknown = sorted(set(files) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BundleError(f"{where}: lists files a bundle does not hold: {', '.join(unknown)}")
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        raise BundleError(f"{where}: does not list {', '.join(missing)}: not a complete trd-hpc bundle")
    for f in OPTIONAL:  # present but unlisted: refused, not skipped (someone put it there)
        if f not in files and (path / f).exists():
            raise BundleError(f"{path / f}: present but not listed in {where}: refused")


def load_bundle(source: str | Path) -> Bundle:
    """A run directory (its ``bundle/``) or a bundle folder; BundleError naming the file."""
    import yaml

    from trd_hpc.config import ConfigError, safe_load_yaml, validate_experiment

    path = Path(source)
    if (path / DIR / "bundle.json").is_file():
        path = path / DIR
    if not (path / "bundle.json").is_file():
        if (path / "config.yaml").is_file():
            raise BundleError(
                f"{path}: a run directory without a bundle (it is written when the evaluation ends: "
                f"`trd-hpc evaluate {path}`)"
            )
        raise BundleError(f"{path}: no bundle.json here or in {path / DIR}: not a trd-hpc run or bundle")
    try:
        listing = (path / "bundle.json").read_bytes()
        meta = json.loads(listing.decode())
    except (ValueError, UnicodeDecodeError, OSError):
        raise BundleError(f"{path / 'bundle.json'}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(
            f"{path / 'bundle.json'}: field 'format' is {meta.get('format') if isinstance(meta, dict) else None!r}, not {FORMAT!r}"
        )
    if meta.get("version") != VERSION:
        old = meta.get("version") == 1
        raise BundleError(
            f"{path / 'bundle.json'}: bundle format version {meta.get('version')!r}; this trd-hpc reads "
            f"version {VERSION}"
            + (
                " (version 1 carries no file hashes; `trd-hpc evaluate RUN` rewrites the bundle of a run you trust)"
                if old
                else " (use the trd-hpc that wrote it)"
            )
        )
    _check_listing(path, meta)
    try:
        text = _verified_bytes(path, "config.yaml", meta).decode()
        cfg = validate_experiment(safe_load_yaml(text) or {}, str(path / "config.yaml"))
    except UnicodeDecodeError:
        raise BundleError(f"{path / 'config.yaml'}: not UTF-8 text") from None
    except (ConfigError, yaml.YAMLError) as e:
        raise BundleError(f"{path / 'config.yaml'}: {e}") from None
    cal = _read(path, "calibrators.json", meta) if "calibrators.json" in meta["files"] else {}
    b = Bundle(
        path,
        meta,
        cfg,
        cal,
        _read(path, "preprocessing.json", meta),
        _read(path, "schema.json", meta),
        _read(path, "metrics.json", meta),
        digest=_sha256(listing),
    )
    _check_default_calibrator(b)
    return b


def _check_default_calibrator(b: Bundle) -> None:
    """A default calibrator the bundle does not hold would make p_trd_calibrated silently the
    plain sigmoid: refused."""
    name = b.calibrators.get("default") if isinstance(b.calibrators, dict) else None
    if name is not None and not isinstance((b.calibrators.get("fitted") or {}).get(name), dict):
        raise BundleError(
            f"{b.path / 'calibrators.json'}: the default calibrator {name!r} is not among the fitted ones "
            f"({', '.join(b.calibrators.get('fitted') or {}) or 'none'}): refused"
        )
