"""trd-hpc as a user without the source has it: a wheel built from this checkout and installed
into a fresh virtual environment outside it.

The environment gets no package index: the wheel goes in with --no-deps and the checkout
interpreter's site-packages (torch, h5py, ...) are added through a .pth line, which puts that
folder on sys.path without running its own .pth files (so the editable install of this checkout
is not active there: ``import trd_hpc`` finds the wheel's copy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "trd_hpc")


def build_wheel(work: Path) -> Path:
    """The wheel of the checkout's current files (copied first, so the build leaves nothing in it)."""
    src = work / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = work / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out.glob("trd_hpc-*.whl")
    return wheel


def install(wheel: Path, env_dir: Path) -> Path:
    """A fresh venv at ``env_dir`` holding ``wheel``; returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, capture_output=True, timeout=600)
    bin_dir = env_dir / "bin"
    purelib = subprocess.run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "checkout_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return bin_dir


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(the wheel, the bin folder of a fresh venv holding it)."""
    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(work)
    return wheel, install(wheel, work / "venv")
