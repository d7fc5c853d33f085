"""Is this directory this cohort?  What ``generate`` and ``ingest`` check before they write:
the target must be missing, empty, or hold this very cohort (its cohort.json and
manifest.json, where present, record this config, and every readable shard's own
attributes say it was made with it); anything else is refused untouched unless ``force``.
``shard_problem`` says why an existing shard must be made again (or None: it is kept).
"""

from __future__ import annotations

import re
from pathlib import Path

from trd_hpc.config import CohortConfig, to_dict
from trd_hpc.data import manifest as mf
from trd_hpc.data.kinds import kind_of
from trd_hpc.data.shards import (
    SCHEMA_VERSION,
    CohortError,
    config_diffs,
    config_fingerprint,
    foreign_reason,
    open_shard,
    shard_content_checksum,
    shard_name,
    sidecar_name,
)
from trd_hpc.fsio import TEMP_TAIL, atomic_write_json
from trd_hpc.locks import LOCK_FILE

LAYOUT = "cohort.json"
MANIFEST_LOCK = ".manifest.lock"
_SHARD = re.compile(r"^shard-[0-9]{5,}\.h5$")
# What a cohort directory of this project holds; anything else makes a directory
# without a matching cohort.json / manifest.json someone else's.
_OWN = re.compile(
    r"^(cohort\.json|manifest\.json|harmonization\.npz|shard-[0-9]{5,}\.h5|\.shard-[0-9]{5,}\.(json|lock)|\.manifest\.lock|"
    + re.escape(LOCK_FILE)
    + r"|\.(cohort\.json|manifest\.json|harmonization\.npz|shard-[0-9]{5,}\.h5|\.shard-[0-9]{5,}\.json)"
    + TEMP_TAIL
    + ")$"
)


def default_num_shards(cfg: CohortConfig) -> int:
    return max(1, -(-cfg.n_subjects // cfg.subjects_per_shard))


def _layout_diffs(have: dict, cfg: CohortConfig, num_shards: int) -> list[str]:
    diffs = config_diffs(have.get("config"), cfg)
    if have.get("num_shards") != num_shards:
        diffs.append(f"--num-shards ({have.get('num_shards')} on disk, {num_shards} asked)")
    if have.get("schema_version") != SCHEMA_VERSION:
        diffs.append(f"schema_version ({have.get('schema_version')} on disk, {SCHEMA_VERSION} here)")
    return diffs


def _record_problem(path: Path, cfg: CohortConfig, num_shards: int) -> tuple[str | None, bool]:
    """(why the cohort.json / manifest.json at ``path`` is not this cohort's, whether it is)."""
    data, why = mf.read_json(path)
    if why:
        return f"{path.name} is {why}", False
    if not isinstance(data, dict) or "config" not in data:
        return f"{path.name} is not a trd-hpc cohort record (no 'config')", False
    if path.name == LAYOUT:
        diffs = _layout_diffs(data, cfg, num_shards)
    else:
        diffs = config_diffs(data.get("config"), cfg)
        if data.get("schema_version") != SCHEMA_VERSION:
            diffs.append(f"schema_version ({data.get('schema_version')} on disk, {SCHEMA_VERSION} here)")
        if isinstance(data.get("shards"), list) and len(data["shards"]) != num_shards:
            diffs.append(f"--num-shards ({len(data['shards'])} on disk, {num_shards} asked)")
    if diffs:
        return f"{path.name} records a cohort made differently: {'; '.join(diffs)}", False
    return None, True


def shard_origin(cfg: CohortConfig, path: Path) -> tuple[str, str | None]:
    """("ours", None), ("foreign", why) or ("unreadable", why) for an existing shard file."""
    try:
        with open_shard(path) as f:
            why = foreign_reason(f, cfg)
    except CohortError as e:
        return "unreadable", str(e)
    return ("foreign", why) if why else ("ours", None)


def _sidecar_fingerprint(out: Path, shard_file: str) -> str | None:
    rec, _ = mf.read_json(out / f".{shard_file[:-3]}.json")
    return rec.get("config_fingerprint") if isinstance(rec, dict) else None


def foreign_contents(cfg: CohortConfig, out: Path, num_shards: int | None = None) -> list[str]:
    """What in ``out`` is not (part of) cohort ``cfg``; empty when it may be written to."""
    out = Path(out)
    num_shards = num_shards or default_num_shards(cfg)
    if not out.exists():
        return []
    if not out.is_dir():
        return [f"{out} is not a directory"]
    problems: list[str] = []
    identified = False
    for name in (LAYOUT, mf.MANIFEST):
        if (out / name).exists():
            why, ours = _record_problem(out / name, cfg, num_shards)
            identified |= ours
            if why:
                problems.append(why)
    undecided = []
    for p in sorted(out.glob("shard-*.h5")):
        if not _SHARD.match(p.name):
            continue
        origin, why = shard_origin(cfg, p)
        if origin == "foreign":
            problems.append(f"{p.name} {why}")
        elif origin == "ours":
            identified = True
        elif _sidecar_fingerprint(out, p.name) == config_fingerprint(cfg):
            identified = True
        else:
            undecided.append(p.name)
    if not identified:
        others = sorted(p.name for p in out.iterdir() if not _OWN.match(p.name))
        if others:
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            problems.append(f"it holds files that are not a trd-hpc cohort's ({', '.join(others[:5])}{more})")
        if undecided:
            problems.append(f"{', '.join(undecided[:5])} cannot be read and nothing records which cohort it belongs to")
    return problems


def check_target_dir(cfg: CohortConfig, out: str | Path, num_shards: int | None = None, force: bool = False) -> None:
    """Refuse (CohortError, nothing written) to generate ``cfg`` into ``out``
    unless it is missing, empty, or holds this cohort or part of it.

    ``train`` calls this before generating a missing cohort, so a mistyped
    ``data.cohort`` pointing at someone's directory is refused, not filled.
    ``force`` (``--force``) skips the check: cohort.json, manifest.json and the
    shards of another config are then replaced; other files stay as they are."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CohortError(f"{out}: exists and is not a directory")
    if force:
        return
    problems = foreign_contents(cfg, out, num_shards)
    if problems:
        raise CohortError(
            f"{out} already holds something that is not this cohort: "
            + "; ".join(problems)
            + ". Nothing was changed. Use another --out, or --force to write this cohort there anyway "
            "(replaces cohort.json, manifest.json and those shards)."
        )


def prepare_dir(cfg: CohortConfig, out: Path, num_shards: int, force: bool = False) -> None:
    """Check ``out`` again (under the lock) and pin its config and shard layout in cohort.json."""
    check_target_dir(cfg, out, num_shards, force)
    out.mkdir(parents=True, exist_ok=True)
    want = {"schema_version": SCHEMA_VERSION, "config": to_dict(cfg), "num_shards": num_shards}
    have, _ = mf.read_json(out / LAYOUT) if (out / LAYOUT).exists() else (None, None)
    if have != want:
        atomic_write_json(out / LAYOUT, want)


def shard_problem(
    cfg: CohortConfig, out: Path, k: int, first: int, stop: int, verify: bool = True, force: bool = False
) -> str | None:
    """Why shard ``k`` must be (re)made, or None when it is complete and verifies.

    A shard that its own attributes say belongs to another cohort is not remade
    (CohortError) unless ``force``: it is someone's data, not a broken file."""
    f = out / shard_name(k)
    side = out / sidecar_name(k)
    if not f.exists():
        return "missing"
    origin, why = shard_origin(cfg, f)
    if origin == "foreign":
        if not force:
            raise CohortError(f"{f}: {why}; refusing to replace it (use another --out, or --force)")
        return f"another cohort's ({why})"
    if not side.exists():
        return "no completion record (interrupted?)"
    rec, why = mf.read_json(side)
    if not isinstance(rec, dict):
        return "completion record unreadable"
    try:
        if rec.get("config_fingerprint") != config_fingerprint(cfg) or (rec["first_subject"], rec["n_subjects"]) != (
            first,
            stop - first,
        ):
            return "made with another config or layout"
        if f.stat().st_size != rec["bytes"]:
            return f"size {f.stat().st_size} != recorded {rec['bytes']} (truncated?)"
    except KeyError:
        return "completion record incomplete"
    if origin == "unreadable":
        return f"unreadable: {why}"
    stamp = kind_of(cfg).source_stamp
    if stamp is not None:
        recorded = rec.get("sources") or []
        for j, (src, now) in enumerate(stamp(cfg, first, stop)):
            if j >= len(recorded) or list(recorded[j]) != now:
                return f"its source {src} changed since the shard was written"
    if verify:
        try:
            got = shard_content_checksum(f, cfg)
        except (CohortError, OSError, KeyError, ValueError) as e:
            return f"unreadable: {e}"
        if got != rec.get("checksum"):
            return "checksum mismatch (corrupt)"
    return None
