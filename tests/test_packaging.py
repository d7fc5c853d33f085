"""The package carries its configs and sweep specs: an installed wheel, outside the checkout,
finds them by name (``trd-hpc config show emt``); the reproduction of paper 000 from the
wheel is in tests/test_reproduce.py."""

from __future__ import annotations

import subprocess
import zipfile

import pytest
import yaml

from tests.conftest import REPO
from tests.installed import wheel_env  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow


def test_the_wheel_holds_every_packaged_config_sweep_and_deepspeed_file(wheel_env):
    wheel, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, suffix in (("configs", ".yaml"), ("tune", ".yaml"), ("configs/deepspeed", ".json")):
        for link in sorted((REPO / folder).glob(f"*{suffix}")):
            packaged = link.resolve().relative_to(REPO).as_posix()
            assert packaged.startswith("trd_hpc/") and packaged in names, (link, packaged)
    for template in sorted((REPO / "trd_hpc/eval/templates").glob("*.j2")):
        assert template.relative_to(REPO).as_posix() in names


def test_an_installed_wheel_shows_and_lists_packaged_configs_by_name(wheel_env, tmp_path):
    _, bin_dir = wheel_env
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import trd_hpc; print(trd_hpc.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(bin_dir.parent) in where and str(REPO) not in where, where

    def run(*args, check=True):
        return subprocess.run(
            [str(bin_dir / "trd-hpc"), *args], cwd=tmp_path, capture_output=True, text=True, check=check
        )

    shown = yaml.safe_load(run("config", "show", "emt", "train.max_epochs=3").stdout)
    assert shown["task"] == "emt" and shown["train"]["max_epochs"] == 3
    assert shown["cohort"]["fmri"]["shape"] == [48, 48, 24, 80]  # paper 000's grid, from emt.yaml
    listed = run("config", "list").stdout
    for name in ("emt", "emt_tiny", "cnn3d", "cnn3d_tiny", "cnn3d_grid", "cnn3d_asha", "emt_asha", "zero1_bf16"):
        assert name in listed
    assert str(REPO) not in listed  # the wheel's own files
    # a path is a path: configs/emt.yaml does not exist here, and is not taken from the package
    missing = run("config", "show", "configs/emt.yaml", check=False)
    assert missing.returncode != 0 and "configs/emt.yaml" in missing.stderr
    typo = run("config", "show", "emt_tinny", check=False)
    assert typo.returncode != 0 and "no packaged config named 'emt_tinny'" in typo.stderr and "emt_tiny" in typo.stderr
    # a packaged sweep spec and its base config resolve inside the package
    sweep = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "from trd_hpc.tune.spec import load_spec; s = load_spec('cnn3d_grid'); print(s.base_path)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "site-packages/trd_hpc/tasks/cnn3d/configs/cnn3d.yaml" in sweep, sweep
