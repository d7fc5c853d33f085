"""Files of a BIDS derivatives folder (fMRIPrep's layout) found by their entities.

Each file under ``sub-*/`` is parsed once with pybids' own entity patterns (the ``bids`` and
``derivatives`` configurations: subject, session, task, run, space, desc, suffix, extension,
...), and a subject's image is the one file whose entities match the spec's.  pybids'
``BIDSLayout`` is not used: it indexes every file into an SQL database, about 1 ms a file,
minutes for a large cohort; parsing with the same patterns over one directory walk costs a
tenth of that.  Needs ``pip install 'trd-hpc[bids]'``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from trd_hpc.errors import ConfigError, IngestError

IMAGE_EXTENSIONS = (".nii.gz", ".nii")


@lru_cache(maxsize=1)
def _entities():
    try:
        from bids.layout.models import Config
    except ImportError:
        raise ConfigError(
            "a spec naming a derivatives folder needs pybids and nilearn: pip install 'trd-hpc[bids]'"
        ) from None
    ents: dict = {}
    for name in ("bids", "derivatives"):
        ents.update(Config.load(name).entities)
    return list(ents.values())


def parse(path: str) -> dict:
    """The entities of one file name (pybids' patterns)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(path, entities=_entities())


class Derivatives:
    """The files of a derivatives folder by subject label, with their entities."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise IngestError(f"derivatives folder {self.root} not found")
        self.files: dict[str, list[tuple[dict, Path]]] = {}
        for entry in os.scandir(self.root):
            if entry.is_dir() and entry.name.startswith("sub-"):
                key = entry.name[4:]
                found = self.files.setdefault(key, [])
                for dirpath, _, names in os.walk(entry.path):
                    for n in names:
                        p = os.path.join(dirpath, n)
                        found.append((parse(os.path.relpath(p, self.root)), Path(p)))
        self.description = self._description()

    def _description(self) -> dict:
        p = self.root / "dataset_description.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, ValueError) as e:
            raise IngestError(f"{p}: not valid JSON ({e})") from None

    def generated_by(self) -> list[str]:
        """The pipelines that wrote the folder, as its dataset_description.json names them."""
        out = []
        for g in self.description.get("GeneratedBy") or []:
            if isinstance(g, dict) and g.get("Name"):
                out.append(f"{g['Name']} {g.get('Version', '')}".strip())
        return out

    def find(self, key: str, want: dict, extensions: tuple[str, ...]) -> list[Path]:
        """The files of subject ``key`` whose entities include ``want`` and whose extension is one of ``extensions``."""
        out = []
        for ents, p in self.files.get(key, []):
            if ents.get("extension") not in extensions:
                continue
            if all(str(ents.get(k)) == str(v) if k != "run" else _run(ents.get(k)) == v for k, v in want.items()):
                out.append(p)
        return sorted(out)

    def expected(self, key: str, want: dict, datatype: str = "func", extension: str = ".nii.gz") -> Path:
        """The file name a pipeline following BIDS would give (named when a subject has none)."""
        order = ("session", "task", "acquisition", "run", "space", "desc")
        short = {"session": "ses", "acquisition": "acq"}
        parts = [f"sub-{key}"] + [f"{short.get(k, k)}-{want[k]}" for k in order if k in want]
        folder = self.root / f"sub-{key}"
        if "session" in want:
            folder = folder / f"ses-{want['session']}"
        return folder / datatype / ("_".join(parts) + f"_{want['suffix']}{extension}")


def _run(v) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=4)
def index(root: str) -> Derivatives:
    """The index of ``root``, built once per process."""
    return Derivatives(Path(root))


def one(d: Derivatives, key: str, want: dict, spec_key: str, extensions=IMAGE_EXTENSIONS) -> Path | None:
    """Subject ``key``'s single matching file, None when it has none; several are an error."""
    hits = d.find(key, want, extensions)
    if len(hits) > 1:
        names = ", ".join(p.name for p in hits[:4])
        raise IngestError(
            f"spec key '{spec_key}': subject {key} has {len(hits)} files matching {want} in {d.root} ({names}); "
            "name the one to use with run:, session:, acquisition: or space:"
        )
    return hits[0] if hits else None


def sidecar(image: Path) -> dict:
    """The JSON sidecar of an image (same name, .json), or {}."""
    name = image.name
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            p = image.with_name(name[: -len(ext)] + ".json")
            if p.is_file():
                try:
                    return json.loads(p.read_text())
                except ValueError as e:
                    raise IngestError(f"{p}: not valid JSON ({e})") from None
    return {}


def confounds_entities(images: dict) -> dict:
    """The entities of an image's confounds TSV, as fMRIPrep names it: the same subject, session,
    task, acquisition and run, no space, ``desc-confounds_timeseries.tsv``."""
    keep = {k: v for k, v in images.items() if k in ("session", "task", "acquisition", "run")}
    return {**keep, "desc": "confounds", "suffix": "timeseries"}


def mask_entities(images: dict) -> dict:
    """The entities of the brain mask fMRIPrep writes beside a preprocessed image."""
    keep = {k: v for k, v in images.items() if k in ("session", "task", "acquisition", "run", "space")}
    return {**keep, "desc": "brain", "suffix": "mask"}
