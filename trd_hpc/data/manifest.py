"""``manifest.json``: the index of a cohort directory.

It records the schema version, the full generator config, every shard (file,
subject-id range, count, content checksum, labels as a digit string), the
class counts and the subject-level splits (and folds for volume cohorts).

Loading checks the structure before anything is opened: shard files named as
this project names them (``shard-NNNNN.h5``, directly in the cohort directory),
contiguous subject ranges covering the config's subjects, and split and fold ids
that are in range, unique and disjoint (a test subject in the training split is
leakage, not a preference).  Each failure names manifest.json and the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trd_hpc.config import CohortConfig, ConfigError, validate_cohort
from trd_hpc.data.kinds import kind_of
from trd_hpc.data.shards import SCHEMA_VERSION, CohortError, schema
from trd_hpc.data.splits import fold_parts
from trd_hpc.fsio import atomic_write_json

MANIFEST = "manifest.json"
# The only shard names a manifest may hold: no directory part, so nothing outside
# the cohort directory (../../etc/passwd, /abs/path) is ever opened.
SHARD_FILE = re.compile(r"^shard-[0-9]{5,}\.h5$")
SPLITS = ("train", "val", "test")


def class_names(cfg: CohortConfig) -> list[str]:
    return kind_of(cfg).class_names(cfg)


@dataclass
class Manifest:
    root: Path
    config: CohortConfig
    shards: list[dict]
    splits: dict[str, list[int]]
    folds: list[list[int]] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def n_subjects(self) -> int:
        return sum(s["n_subjects"] for s in self.shards)

    @property
    def kind(self) -> str:
        return self.config.kind

    def labels(self) -> np.ndarray:
        """Every subject's class (int64; -1 for a subject of an unlabelled cohort)."""
        return decode_labels("".join(s["labels"] for s in self.shards))

    @property
    def virtual(self) -> bool:
        """No shard files: subjects are regenerated from (seed, i) when read."""
        return bool(self.raw.get("virtual", False))

    @property
    def labelled(self) -> bool:
        return bool(self.raw.get("labelled", True))

    def subjects(self, split: str) -> list[int]:
        """Subject ids of a split: train | val | test | all | fold:K (held-out fold K)
        | fold:K:train | fold:K:val | fold:K:test."""
        if split == "all":
            return list(range(self.n_subjects))
        if split in self.splits:
            return list(self.splits[split])
        parts = split.split(":")
        if parts[0] == "fold" and len(parts) in (2, 3) and parts[1].isdigit() and self.folds:
            k = int(parts[1])
            if len(parts) == 2:
                if k >= len(self.folds):
                    raise KeyError(
                        f"fold {k} does not exist in {self.root / MANIFEST} (folds 0..{len(self.folds) - 1})"
                    )
                return list(self.folds[k])
            if parts[2] in ("train", "val", "test"):
                val = getattr(self.config.split, "val", 0.15)
                groups = self.raw.get("groups")  # sites of an ingested cohort: whole sites per part
                groups = None if groups is None else np.asarray(groups, dtype=np.int64)
                return fold_parts(self.folds, self.labels(), k, val, self.config.seed, groups)[parts[2]]
        valid = sorted(self.splits) + ["all"] + (["fold:K", "fold:K:train|val|test"] if self.folds else [])
        raise KeyError(f"unknown split '{split}' for cohort {self.root}; valid: {', '.join(valid)}")


def decode_labels(digits: str) -> np.ndarray:
    """The inverse of shards.encode_labels: '?' (unlabelled) is -1."""
    a = np.frombuffer(digits.encode(), dtype=np.uint8).astype(np.int64) - ord("0")
    a[a == ord("?") - ord("0")] = -1
    return a


def write_manifest(root: Path, data: dict) -> None:
    atomic_write_json(Path(root) / MANIFEST, data, indent=1)


def read_json(path: Path) -> tuple[object, str | None]:
    """(parsed JSON, None) or (None, why it could not be read)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e})"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _id_array(path: Path, key: str, ids, n: int) -> np.ndarray:
    # one pass in C over the types (a million ids: milliseconds); bool is not an id
    if not isinstance(ids, list) or not set(map(type, ids)) <= {int}:
        raise CohortError(f"{path}: key '{key}' must be a list of integer subject ids")
    a = np.asarray(ids, dtype=np.int64)
    if len(a) and (a.min() < 0 or a.max() >= n):
        bad = int(a[(a < 0) | (a >= n)][0])
        raise CohortError(f"{path}: key '{key}' names subject {bad}, outside the cohort's 0..{n - 1}")
    srt = np.sort(a)  # sorting beats np.unique's hash table at 10^6 ids
    dup = np.flatnonzero(srt[1:] == srt[:-1])
    if len(dup):
        v = srt[dup[0]]
        raise CohortError(f"{path}: key '{key}' lists subject {int(v)} {int((a == v).sum())} times")
    return a


def _disjoint(path: Path, parts: dict[str, np.ndarray], what: str) -> None:
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = np.intersect1d(parts[a], parts[b], assume_unique=True)  # each checked unique
            if len(both):
                raise CohortError(
                    f"{path}: keys '{a}' and '{b}' share {len(both)} subject(s) (e.g. {int(both[0])}): "
                    f"{what} must be disjoint, or evaluation leaks into training"
                )


def splits_fingerprint(splits: dict, folds: list) -> str:
    """sha256 of the splits and folds as written when the cohort was made (``splits_sha256``)."""
    import hashlib

    text = json.dumps({"splits": {k: list(v) for k, v in splits.items()}, "folds": [list(f) for f in folds]},
                      sort_keys=True, separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _check_groups(path: Path, data: dict, parts: dict[str, np.ndarray], n: int) -> None:
    """Every group (an ingested cohort's site, or site and family) sits in one part alone."""
    groups = data.get("groups")
    if groups is None:
        return
    if not isinstance(groups, list) or len(groups) != n or not all(_is_int(g) for g in groups):
        raise CohortError(f"{path}: key 'groups' must be {n} integers, one per subject")
    g = np.asarray(groups, dtype=np.int64)
    names = data.get("group_names") or []
    where: dict[int, list[str]] = {}
    for part, ids in parts.items():
        for v in np.unique(g[ids]):
            where.setdefault(int(v), []).append(part)
    crossing = {v: ps for v, ps in where.items() if len(ps) > 1}
    if crossing:
        v, ps = next(iter(crossing.items()))
        name = names[v] if 0 <= v < len(names) else str(v)
        ids = [int(i) for p in ps for i in parts[p][g[parts[p]] == v][:3]]
        raise CohortError(
            f"{path}: group {name!r} has subjects in {' and '.join(ps)} (subjects {', '.join(map(str, ids))}"
            f"{f'; {len(crossing) - 1} more group(s) cross too' if len(crossing) > 1 else ''}): a site or family in "
            "two parts leaks its effects into the evaluation; make the cohort again"
        )


def _check_structure(path: Path, data: dict, cfg: CohortConfig) -> None:
    shards = data["shards"]
    if not isinstance(shards, list) or not shards:
        raise CohortError(f"{path}: key 'shards' must be a non-empty list")
    n_classes = len(class_names(cfg))
    unknown = "" if getattr(cfg, "labelled", True) else "?"  # an unlabelled cohort's subjects have no class
    first = 0
    seen: set[str] = set()
    for k, s in enumerate(shards):
        key = f"shards[{k}]"
        if not isinstance(s, dict):
            raise CohortError(f"{path}: key '{key}' must be an object")
        for f in ("file", "first_subject", "n_subjects", "bytes", "checksum", "labels"):
            if f not in s:
                raise CohortError(f"{path}: key '{key}.{f}' is missing")
        name = s["file"]
        if not isinstance(name, str) or not SHARD_FILE.match(name):
            raise CohortError(
                f"{path}: key '{key}.file' is {name!r}; a shard must be a file named shard-NNNNN.h5 directly "
                f"inside the cohort directory"
            )
        if name in seen:
            raise CohortError(f"{path}: key '{key}.file' names {name} a second time")
        seen.add(name)
        for f in ("first_subject", "n_subjects", "bytes"):
            if not _is_int(s[f]) or s[f] < (1 if f == "n_subjects" else 0):
                raise CohortError(
                    f"{path}: key '{key}.{f}' must be a {'positive' if f == 'n_subjects' else 'non-negative'} integer, got {s[f]!r}"
                )
        if s["first_subject"] != first:
            raise CohortError(
                f"{path}: key '{key}.first_subject' is {s['first_subject']}, expected {first}: the shards must "
                f"cover the subjects in order without gaps (is a shard entry missing?)"
            )
        labels = s["labels"]
        if (
            not isinstance(labels, str)
            or len(labels) != s["n_subjects"]
            or not set(labels) <= {str(k) for k in range(n_classes)} | set(unknown)
        ):
            raise CohortError(
                f"{path}: key '{key}.labels' must be {s['n_subjects']} digits 0..{n_classes - 1}"
                + (" or '?'" if unknown else "")
            )
        crcs = s.get("row_crc32")
        if crcs is not None and (
            not isinstance(crcs, list) or len(crcs) != s["n_subjects"] or not all(_is_int(c) for c in crcs)
        ):
            raise CohortError(f"{path}: key '{key}.row_crc32' must be {s['n_subjects']} integers")
        first += s["n_subjects"]
    if first != cfg.n_subjects:
        raise CohortError(
            f"{path}: key 'shards' covers {first} subjects, key 'config.n_subjects' says {cfg.n_subjects} "
            f"(is a shard entry missing?)"
        )
    splits = data["splits"]
    if not isinstance(splits, dict):
        raise CohortError(f"{path}: key 'splits' must be an object with {', '.join(SPLITS)}")
    for name in SPLITS:
        if name not in splits:
            raise CohortError(f"{path}: key 'splits.{name}' is missing")
    parts = {f"splits.{name}": _id_array(path, f"splits.{name}", ids, first) for name, ids in splits.items()}
    _disjoint(path, parts, "the splits")
    folds = data.get("folds", [])
    if not isinstance(folds, list):
        raise CohortError(f"{path}: key 'folds' must be a list of lists of subject ids")
    fold_parts = {f"folds[{k}]": _id_array(path, f"folds[{k}]", f, first) for k, f in enumerate(folds)}
    _disjoint(path, fold_parts, "the folds")
    fp = data.get("splits_sha256")
    if fp is not None and fp != splits_fingerprint(splits, folds):
        raise CohortError(
            f"{path}: key 'splits_sha256' does not match the splits and folds: they were changed after the cohort "
            "was made (a test split must stay the one fixed then); make the cohort again"
        )
    _check_groups(path, data, {k.split(".")[-1]: v for k, v in parts.items()}, first)
    _check_groups(path, data, fold_parts, first)


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise CohortError(f"{root}: cohort directory does not exist")
    if not path.is_file():
        raise CohortError(f"{path}: no manifest (run `trd-hpc generate ... --out {root}` or `--finalize`)")
    data, why = read_json(path)
    if why:
        raise CohortError(f"{path}: {why}; regenerate it with `trd-hpc generate ... --out {root} --finalize`")
    if not isinstance(data, dict):
        raise CohortError(f"{path}: not a cohort manifest (a JSON {type(data).__name__}, not an object)")
    v = data.get("schema_version")
    if v != SCHEMA_VERSION:
        raise CohortError(f"{path}: field 'schema_version' is {v!r}; this version of trd-hpc reads {SCHEMA_VERSION}")
    for key in ("config", "shards", "splits"):
        if key not in data:
            raise CohortError(f"{path}: field '{key}' is missing")
    try:
        cfg = validate_cohort(data["config"], f"{path} field 'config'")
    except ConfigError as e:
        raise CohortError(str(e)) from None
    _check_structure(path, data, cfg)
    m = Manifest(root, cfg, data["shards"], data["splits"], data.get("folds", []), data)
    m.columns = schema(cfg)  # type: ignore[attr-defined]
    return m


def cohort_identity(root: str | Path) -> dict:
    """What a run was trained or evaluated on, as every record of it names it.

    ``origin`` is ``synthetic`` (made by a generator from a seed) or ``ingested`` (read
    from a study's files by `trd-hpc ingest`); ``manifest_sha256`` is the sha256 of the
    cohort's ``manifest.json`` bytes (64 hex digits), which pins the config, the shards'
    checksums and the splits.  Reads the manifest (checked) and nothing else."""
    import hashlib

    root = Path(root)
    m = load_manifest(root)
    digest = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    generated = kind_of(m.config).generated
    out: dict = {
        "path": str(root.resolve()),
        "kind": m.kind,
        "origin": "synthetic" if generated else "ingested",
        "manifest_sha256": digest,
        "n_subjects": m.n_subjects,
    }
    if generated:
        out["generator"] = kind_of(m.config).generator or m.kind
        out["seed"] = int(m.config.seed)
        out["virtual"] = m.virtual
    else:
        src = m.raw.get("source") or {}
        out["table_sha256"] = src.get("table_sha256")
        out["spec_folder"] = src.get("spec_folder")
    return out


def identity_line(ident: dict) -> str:
    """One line for a banner or console: ``synthetic cohort (paper 000 generator, seed 7)``
    or ``ingested from /data/study (participants table sha256 1a2b3c4d…)``, with the
    manifest's sha256 prefix."""
    if ident.get("origin") == "synthetic":
        virtual = ", virtual: regenerated in the loader" if ident.get("virtual") else ""
        what = f"synthetic cohort ({ident.get('generator')} generator, seed {ident.get('seed')}{virtual})"
    else:
        table = str(ident.get("table_sha256") or "")[:12]
        where = f" from {ident['spec_folder']}" if ident.get("spec_folder") else ""
        what = f"ingested{where} (participants table sha256 {table})"
    return f"{what}, manifest sha256 {str(ident.get('manifest_sha256', ''))[:12]}"


def nearby_cohorts(root: str | Path, limit: int = 3) -> list[Path]:
    """Existing cohort directories whose names are closest to ``root``'s, among its siblings
    (and the siblings' children, for a mistyped parent): what a "no cohort there" error
    suggests.  Only directories holding a manifest.json count."""
    import difflib

    root = Path(root)
    parent = root.parent
    seen: list[Path] = []
    for base in (parent, parent.parent):
        if not base.is_dir():
            continue
        try:
            entries = sorted(base.iterdir())
        except OSError:
            continue
        for d in entries[:2000]:  # a huge data folder: the first entries are enough for a hint
            if d.is_dir() and (d / MANIFEST).is_file():
                seen.append(d)
    by_name = {str(d): d for d in seen}
    close = difflib.get_close_matches(str(root), list(by_name), n=limit, cutoff=0.6)
    return [by_name[c] for c in close]
