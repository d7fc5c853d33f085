"""Shared fixtures.  Real HDF5 files in temporary directories, tiny configs.

In CI (CI=true) a skipped test is a failure, except a skip whose reason starts
with "no GPU": every other real part (SLURM, Ray, DeepSpeed, W&B offline,
gloo) must run there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Training tests do not need a W&B run each (~1 s apiece); the tracking tests turn it on.
os.environ.setdefault("WANDB_MODE", "disabled")
ALLOWED_SKIP_PREFIX = "no GPU"

try:  # the SLURM cluster fixtures, when present
    from tests.cluster.fixtures import slurm_cluster, slurm_two_nodes  # noqa: F401
except ImportError:  # pragma: no cover
    pass


# The markers a test gets from the real service it uses (through its fixtures, however deep).
SERVICE_FIXTURES = {"slurm_cluster": ("slurm",), "slurm_two_nodes": ("slurm", "multinode"), "local_ray": ("ray",)}
NOT_UNIT = {"slurm", "multinode", "ray", "gpu", "slow"}


def pytest_collection_modifyitems(config, items):
    """Mark each test by what it needs: `slurm` / `ray` from the fixtures it uses, and `unit`
    for a test that needs nothing but this CPU and Python (HDF5 files and gloo process
    groups included) and is not slow: `python3 dev.py test -m unit` is the quick subset."""
    for item in items:
        for fixture, markers in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    item.add_marker(marker)
        if not NOT_UNIT & {m.name for m in item.iter_markers()}:
            item.add_marker("unit")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if IN_CI and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(ALLOWED_SKIP_PREFIX):
            rep.outcome = "failed"
            rep.longrepr = f"skipped in CI, where this real part must run: {reason}"


def cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None, timeout: float = 600):
    """Run ``trd-hpc`` as a user would (a subprocess of this interpreter)."""
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(
        [sys.executable, "-m", "trd_hpc.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"trd-hpc {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def train_tiny(out: Path, *overrides: str, config: str = "emt_tiny.yaml", epochs: int = 1) -> Path:
    """``trd-hpc train configs/CONFIG --out OUT`` as a quick test run: quiet, no baselines, no
    W&B; ``overrides`` (data.cohort=..., --generate, ...) come last and win."""
    cli(
        "train",
        str(CONFIGS / config),
        "--out",
        str(out),
        "--quiet",
        f"train.max_epochs={epochs}",
        "eval.baselines=[]",
        "tracking.wandb=false",
        *overrides,
    )
    return out


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs of its own, for full and read-only disks (root may mount; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session")
def emt_tiny():
    from trd_hpc.config import load_config

    return load_config(CONFIGS / "emt_tiny.yaml")


@pytest.fixture(scope="session")
def cnn3d_tiny():
    from trd_hpc.config import load_config

    return load_config(CONFIGS / "cnn3d_tiny.yaml")


@pytest.fixture(scope="session")
def emt_cohort_dir(tmp_path_factory, emt_tiny):
    """A tiny EMT cohort made once per session (copy it before changing it)."""
    from trd_hpc.data.generate import generate

    out = tmp_path_factory.mktemp("emt_cohort") / "cohort"
    generate(emt_tiny.cohort, out, progress=False)
    return out


@pytest.fixture(scope="session")
def volume_cohort_dir(tmp_path_factory, cnn3d_tiny):
    from trd_hpc.data.generate import generate

    out = tmp_path_factory.mktemp("vol_cohort") / "cohort"
    generate(cnn3d_tiny.cohort, out, progress=False)
    return out


@pytest.fixture
def emt_cohort_copy(emt_cohort_dir, tmp_path):
    dst = tmp_path / "cohort"
    shutil.copytree(emt_cohort_dir, dst)
    return dst


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its size and bytes (for 'nothing changed' checks)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }
