"""``trd-hpc predict``: a trained model (its bundle) applied to a cohort's subjects.

The cohort is checked against the bundle's schema first (every mismatch named); batches
are prepared as the training cohort's were (``CohortDataset(prepare_with=...)``: the
training split's clinical statistics, the same volume normalisation), read in the order
and batch size evaluation used, so the training cohort's test split gives exactly the
probabilities of ``predictions/test.npz``.  Rows are streamed to a part file per process
(memory O(batch)); under ``torchrun`` every rank predicts its slice and rank 0 merges, and
as a SLURM array (``--shard-index K --num-shards N``) each task writes part K and
``--finalize`` merges the parts in subject order.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trd_hpc.bundle import Bundle, load_bundle
from trd_hpc.data.trace import participant_ids as _participant_ids
from trd_hpc.data.trace import trace as _trace
from trd_hpc.errors import CohortError, ConfigError
from trd_hpc.fsio import atomic_path, atomic_write_json, csv_text, remove_stale_temps, safe_filename

SPLITS_HELP = "test | val | train | all | fold:K"


@dataclass
class PredictResult:
    out: Path
    rows: int = 0
    parts: list[Path] = field(default_factory=list)
    merged: bool = False
    calibrator: str | None = None
    explained: Path | None = None  # the explanations' summary CSV
    bundle_sha256: str | None = None


def cohort_problems(b: Bundle, m) -> list[str]:
    """How the cohort of manifest ``m`` differs from what the bundle's model takes."""
    from trd_hpc.data.kinds import kind_of
    from trd_hpc.tasks import spec_for

    co = m.config
    cols = {c.name: c for c in kind_of(co).schema(co)}
    out = []
    for col in b.schema["inputs"]:
        have = cols.get(col["name"])
        if have is None:
            out.append(f"no '{col['name']}' input (the model takes {', '.join(c['name'] for c in b.schema['inputs'])})")
        elif list(have.shape) != list(col["shape"]):
            out.append(f"'{col['name']}' is {tuple(have.shape)} per subject, the model takes {tuple(col['shape'])}")
    out.extend(_harmonization_problems(b, co))
    hook = spec_for(b.cfg).cohort_mismatch
    if hook is not None and not out:
        out.extend(hook(b, co))
    return out


def _harmonization_problems(b: Bundle, co) -> list[str]:
    """A model trained on ComBat-harmonised volumes takes volumes harmonised with its
    estimates, and only those (trd_hpc.ingest.harmonize)."""

    def sha(c):
        rec = getattr(getattr(c, "resolved", None), "harmonization", None)
        return None if rec is None else rec.sha256

    want, have = sha(b.cfg.cohort), sha(co)
    if want == have:
        return []
    if have is None:
        return [
            "the model was trained on ComBat-harmonised volumes and this cohort's are not: ingest it with "
            f"harmonize: {{estimates: {b.path / 'harmonization.npz'}, ...}} (predict --bids does that)"
        ]
    if want is None:
        return ["this cohort's volumes are ComBat-harmonised; the model was trained on volumes that were not"]
    return [f"this cohort was harmonised with other estimates ({have[:12]}) than the model's ({want[:12]})"]


def part_name(out: Path, k: int, total: int) -> Path:
    return out.with_name(f"{out.name}.part-{k:05d}-of-{total:05d}.csv")


def provenance_path(out: Path) -> Path:
    """``OUT.provenance.json``: which model (bundle digest) predicted which cohort (identity)."""
    return out.with_name(out.name + ".provenance.json")


def _provenance(b: Bundle, cohort, split: str) -> dict:
    from trd_hpc import __version__
    from trd_hpc.data.manifest import cohort_identity

    return {
        "model": {
            "bundle": str(b.path.resolve()),
            "bundle_sha256": b.digest,
            "task": b.task,
            "model": b.cfg.model.name,
            "calibrator": b.calibrators.get("default") if b.calibrators else None,
        },
        "cohort": cohort_identity(cohort),
        "split": split,
        "written_by": f"trd-hpc {__version__}",
    }


def _same_run(a: dict, b: dict) -> bool:
    """Two parts' provenance agree on the model, the cohort and the split."""
    key = lambda p: (p["model"]["bundle_sha256"], p["cohort"]["manifest_sha256"], p["split"])  # noqa: E731
    return key(a) == key(b)


def _check_parquet(out: Path) -> None:
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                f"--out {out}: Parquet needs pyarrow ({e}); pip install 'trd-hpc[predict]' (or pyarrow), or write .csv"
            ) from None


def _check_request(out: Path, shard_index: int | None, num_shards: int | None) -> None:
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"--out {out}: predictions are written as .csv or .parquet")
    if (shard_index is None) != (num_shards is None):
        raise ConfigError("--shard-index and --num-shards go together (one SLURM array task each)")
    if num_shards is not None and not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    _check_parquet(out)  # before any work, not after the last batch


def _place(model, b, device: str):
    """(DistInfo, device, world size): the model moved there, CPU threads as in the run."""
    from trd_hpc.train import distributed as D

    world = int(os.environ.get("WORLD_SIZE", 1))
    info = D.init("ddp" if world > 1 else "single", device) if world > 1 else D.DistInfo()
    dev = info.device if world > 1 else D.pick_device(device, 0)
    model.to(dev)
    if dev.type == "cpu":
        # the run's thread count: CPU kernels sum in an order that depends on it, and the same
        # order gives the same bits as the run's own evaluation
        from trd_hpc.train.plan import threads_per_process

        torch.set_num_threads(b.cfg.train.num_threads or threads_per_process(info.local_world_size))
    return info, dev, world


def _write_rows(f, loader, model, task, spec, b, dev, pids, bar, explainer) -> int:
    """One CSV row per subject of the loader (padding dropped); returns the count."""
    w, rows = None, 0
    with torch.no_grad():
        for batch in loader:
            outp = model(**task.inputs(batch, dev, torch.float32))
            cols = spec.prediction_columns(b, outp, batch)
            keep = ~batch["is_pad"].numpy()
            sid = batch["subject_id"].numpy()[keep]
            table = {"subject_id": sid}
            if pids is not None:
                table["participant_id"] = np.array([pids[int(i)] for i in sid], dtype=object)
            table.update({k: np.asarray(v)[keep] for k, v in cols.items()})
            if w is None:
                w = csv.writer(f)
                w.writerow(list(table))
            w.writerows(zip(*(_cells(v) for v in table.values())))
            rows += int(keep.sum())
            bar.update(len(keep))
            if explainer is not None:
                with torch.enable_grad():
                    explainer.batch(model, task.inputs(batch, dev, torch.float32), batch["subject_id"].numpy(), keep)
    if w is None:  # an empty part still says what the columns would be
        csv.writer(f).writerow(["subject_id"])
    return rows


def predict(
    source: str | Path,
    cohort: str | Path,
    out: str | Path = "predictions.csv",
    split: str = "test",
    batch_size: int | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
    device: str = "auto",
    explain: bool = False,
    explain_subjects: list[str] | None = None,
    explain_dir: str | Path | None = None,
) -> PredictResult:
    from tqdm import tqdm

    from trd_hpc.data.dataset import CohortDataset, make_loader
    from trd_hpc.data.manifest import load_manifest
    from trd_hpc.data.sampler import ShardAwareSampler
    from trd_hpc.tasks import make_task, spec_for
    from trd_hpc.train import distributed as D

    out = Path(out)
    _check_request(out, shard_index, num_shards)
    remove_stale_temps(out.parent, name_prefix=out.name)  # left by a predict killed with -9
    b = load_bundle(source)
    m = load_manifest(cohort)
    problems = cohort_problems(b, m)
    if problems:
        raise CohortError(f"{cohort} does not fit the model of {b.path}: " + "; ".join(problems))
    ds = CohortDataset(cohort, split, prepare_with=b.cfg.cohort, normalize_volumes=b.cfg.data.normalize_volumes)
    spec = spec_for(b.cfg)
    if spec.prediction_columns is None:
        raise ConfigError(f"task {b.task} defines no prediction columns (TaskSpec.prediction_columns)")
    task = make_task(b.cfg, str(cohort))
    model = b.build_model()
    info, dev, world = _place(model, b, device)
    parts_total = (num_shards or 1) * info.world_size
    part = (shard_index or 0) * info.world_size + info.rank
    sampler = ShardAwareSampler.for_dataset(
        ds, num_replicas=parts_total, rank=part, shuffle=False, block=b.cfg.data.locality_block
    )
    # read in this process: on a small model a reading thread competes with the forward for the
    # cores more than it hides (bench predict: 1.19 s vs 1.00 s on 6400 tiny-EMT subjects, 2 cores)
    loader = make_loader(ds, batch_size or b.cfg.train.batch_size, sampler, num_workers=0)
    pids = _participant_ids(m, ds.ids) if "participant_id" in {c.name for c in m.columns} else None  # type: ignore[attr-defined]
    single = parts_total == 1
    target = out if single and out.suffix.lower() == ".csv" else part_name(out, part, parts_total)
    res = PredictResult(out, calibrator=b.calibrators.get("default") if b.calibrators else None)
    explainer = (
        _Explainer(b, spec, m, ds.ids, pids, out, explain_subjects, explain_dir, part, parts_total) if explain else None
    )
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        bar = tqdm(
            total=len(sampler),
            unit="subj",
            desc=f"predict {Path(cohort).name}",
            disable=not progress,
            dynamic_ncols=True,
        )
        res.rows = _write_rows(f, loader, model, task, spec, b, dev, pids, bar, explainer)
        bar.close()
    res.parts.append(target)
    atomic_write_json(provenance_path(target), {**_provenance(b, cohort, split), "rows": res.rows})
    res.bundle_sha256 = b.digest
    if explainer is not None:
        res.explained = explainer.finish()
    ds.close()
    if world > 1:
        D.barrier(info)
        if info.is_main and num_shards is None:
            merge_parts(out, parts_total)
            res.merged = True
        D.barrier(info)
        D.shutdown(info)
    elif single and out.suffix.lower() != ".csv":
        merge_parts(out, 1)
        res.merged = True
    elif single:
        res.merged = True
    return res


class _Explainer:
    """Maps and summary rows of the subjects asked for (all predicted ones by default)."""

    def __init__(self, b, spec, m, ids, pids, out: Path, subjects, explain_dir, part: int, total: int):
        if spec.explain is None:
            raise ConfigError(f"task {b.task} has no explanations (TaskSpec.explain)")
        self.b, self.spec = b, spec
        self.dir = Path(explain_dir) if explain_dir else out.with_name(out.stem + "_explanations")
        self.pids = pids
        self.want = None
        if subjects:
            by_name = {str(int(i)): int(i) for i in ids}
            if pids:
                by_name.update({p: i for i, p in pids.items()})
                by_name.update({p.removeprefix("sub-"): i for i, p in pids.items()})
            unknown = [s for s in subjects if s not in by_name]
            if unknown:
                raise ConfigError(f"--subjects: {', '.join(unknown[:5])} not in the predicted split")
            self.want = {by_name[s] for s in subjects}
        self.affines = _trace(m, ids, "affine")
        self.rows: list[dict] = []
        self.name = "explanations.csv" if total == 1 else f"explanations.part-{part:05d}-of-{total:05d}.csv"

    def batch(self, model, inputs: dict, sid: np.ndarray, keep: np.ndarray) -> None:
        from trd_hpc.explain import write_map

        pick = [j for j in range(len(sid)) if keep[j] and (self.want is None or int(sid[j]) in self.want)]
        if not pick:
            return
        idx = torch.as_tensor(pick)
        sub = {k: v[idx] for k, v in inputs.items()}
        for j, (maps, summary) in zip(pick, self.spec.explain(self.b, model, sub)):
            s = int(sid[j])
            pid = (self.pids or {}).get(s)
            stem = safe_filename(pid) if pid else f"subject-{s:06d}"  # an id is data: never a path
            aff = None if self.affines is None else np.asarray(self.affines[s], dtype=np.float64)
            files = {}
            for name, vol in maps.items():
                path = self.dir / f"{stem}_{name}.nii.gz"
                write_map(path, vol, aff)
                files[f"{name}_file"] = path.name
            self.rows.append(
                {
                    "subject_id": s,
                    **({"participant_id": csv_text(pid or stem)} if self.pids else {}),
                    **summary,
                    **files,
                }
            )

    def finish(self) -> Path:
        import pandas as pd

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / self.name
        with atomic_path(path) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        return path


def _cells(column) -> list:
    """A column's CSV cells, as ``_cell`` writes each, formatted a column at a time."""
    a = np.asarray(column)
    if a.dtype.kind == "f":
        return [repr(x) for x in a.astype(np.float64).tolist()]
    if a.dtype.kind in "iub":
        return a.tolist()
    return [_cell(v) for v in column]


def _cell(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # full precision: a CSV that round-trips the float64
    v = v.item() if isinstance(v, np.generic) else v
    return csv_text(v) if isinstance(v, str) else v  # ids come from others' tables


def read_predictions(path: str | Path):
    """A predictions CSV as a DataFrame, every float exactly as written (ids kept as text)."""
    import pandas as pd

    # pandas < 3 parses floats fast but not always to the nearest double; round_trip does
    kw = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(path, dtype={"participant_id": str}, **kw)


def merge_parts(out: str | Path, total: int | None = None) -> Path:
    """Merge ``OUT.part-K-of-N.csv`` (all N present) into OUT in subject order; the parts go."""
    import pandas as pd

    out = Path(out)
    found = sorted(out.parent.glob(f"{out.name}.part-*-of-*.csv"))
    if total is None:
        totals = {p.name.rsplit("-of-", 1)[1][:-4] for p in found}
        if len(totals) != 1:
            raise ConfigError(
                f"{out}: no parts to merge" if not found else f"{out}: parts of different runs ({sorted(totals)})"
            )
        total = int(totals.pop())
    parts = [part_name(out, k, total) for k in range(total)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ConfigError(f"{out}: cannot merge, parts missing: {', '.join(missing[:5])} (run those array tasks)")
    _check_parquet(out)
    provs = []
    for p in parts:
        try:
            provs.append(json.loads(provenance_path(p).read_text()))
        except (OSError, ValueError):
            raise ConfigError(
                f"{provenance_path(p)}: missing or damaged; cannot tell which model and cohort {p.name} came from"
            ) from None
    for p, pv in zip(parts, provs):
        if not _same_run(provs[0], pv):
            raise ConfigError(
                f"{out}: {p.name} was predicted by bundle {pv['model']['bundle_sha256'][:12]} on cohort "
                f"{pv['cohort']['manifest_sha256'][:12]} ({pv['split']}), {parts[0].name} by "
                f"{provs[0]['model']['bundle_sha256'][:12]} on {provs[0]['cohort']['manifest_sha256'][:12]} "
                f"({provs[0]['split']}): parts of different runs are not merged"
            )
    frames = [read_predictions(p) for p in parts]
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
    if "subject_id" in df and len(df):
        df = df.sort_values("subject_id", kind="stable").reset_index(drop=True)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, float_format="%.17g")
    atomic_write_json(provenance_path(out), {**provs[0], "rows": int(len(df)), "parts": total})
    for p in parts:
        p.unlink()
        provenance_path(p).unlink(missing_ok=True)
    return out
