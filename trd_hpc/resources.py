"""The configs and sweep specs that ship inside the package, found by name.

Each paper folder holds its experiment configs (``trd_hpc/tasks/NAME/configs/*.yaml``) and
sweep specs (``.../sweeps/*.yaml``); the DeepSpeed configs are ``trd_hpc/train/deepspeed_configs``.
They are package data, so an installed wheel has them; a source checkout also shows them as
``configs/`` and ``tune/`` (links into the package).

Where a command takes a config, ``emt_tiny`` (no folder, no ``.yaml``) names a packaged one and
anything else is a path: the two never shadow each other.
"""

from __future__ import annotations

from pathlib import Path

from trd_hpc.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
DEEPSPEED = PACKAGE / "train" / "deepspeed_configs"


def _named(sub: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted((PACKAGE / "tasks").glob(f"*/{sub}/*.yaml")):
        out.setdefault(p.stem, p)
    return out


def configs() -> dict[str, Path]:
    """{name: path} of every packaged experiment config."""
    return _named("configs")


def sweeps() -> dict[str, Path]:
    """{name: path} of every packaged sweep spec."""
    return _named("sweeps")


def deepspeed_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DEEPSPEED.glob("*.json"))}


def is_name(ref: str | Path) -> bool:
    """A packaged name: no folder part and no suffix (``emt``, ``cnn3d_grid``)."""
    s = str(ref)
    return bool(s) and "/" not in s and "\\" not in s and "." not in s


def _resolve(ref: str | Path, table: dict[str, Path], what: str) -> Path:
    if not is_name(ref):
        return Path(ref)
    path = table.get(str(ref))
    if path is None:
        raise ConfigError(
            f"no packaged {what} named {str(ref)!r} (a path needs a folder or a .yaml suffix); "
            f"packaged: {', '.join(table) or 'none'}"
        )
    return path


def config_path(ref: str | Path) -> Path:
    """``ref`` as a path, or the packaged experiment config it names."""
    return _resolve(ref, configs(), "config")


def sweep_path(ref: str | Path) -> Path:
    """``ref`` as a path, or the packaged sweep spec it names."""
    return _resolve(ref, sweeps(), "sweep spec")
