"""A paper's whole path for a task that lives outside trd_hpc: the toy task of
tests/toy_task.py (registered through $TRD_HPC_PLUGINS, nothing in trd_hpc/ names it) is
reproduced (generate, train, baselines, evaluation, bundle), predicted and exported by the
same commands as the two papers."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, cli

pytestmark = pytest.mark.slow
PLUGIN = {"TRD_HPC_PLUGINS": "tests.toy_task"}


def test_the_toy_task_is_named_nowhere_in_the_package():
    hits = subprocess.run(
        ["grep", "-rln", "--exclude-dir=__pycache__", "toy_clinical\\|toy000\\|toy_task", str(REPO / "trd_hpc")],
        capture_output=True,
        text=True,
    )
    assert hits.stdout == "", hits.stdout


def test_a_task_of_ones_own_is_reproduced_bundled_predicted_and_exported(tmp_path):
    out = tmp_path / "rep"
    r = cli("reproduce", "toy000", "--out", str(out), "--scale", "tiny", "--quiet", env=PLUGIN, timeout=900)
    md = (out / "reproduction.md").read_text()
    assert "Toy (clinical variables alone)" in md
    for row in ("| accuracy |", "| bias_only accuracy |", "| sklearn_logistic accuracy |"):
        assert row in md, md
    metrics = json.loads((out / "main" / "metrics.json").read_text())
    assert {"baselines.bias_only.accuracy", "baselines.sklearn_logistic.accuracy"} <= set(metrics), r.stdout
    # the bundle asks the toy's own statistics for intervals (a task without any gets {}); ten
    # test subjects are too few for one, and the card says so
    card = json.loads((out / "main" / "bundle" / "model_card.json").read_text())
    assert "not_computed" in card["confidence_intervals_95"], card["confidence_intervals_95"]

    preds = tmp_path / "p.csv"
    cli("predict", str(out / "main"), "--cohort", str(out / "data"), "--out", str(preds), "--quiet", env=PLUGIN)
    rows = list(csv.DictReader(preds.open()))
    assert rows and {"p_trd", "predicted_label", "label"} <= set(rows[0])
    assert all(0.0 <= float(r["p_trd"]) <= 1.0 for r in rows)

    ts = tmp_path / "toy.ts"
    cli("export", str(out / "main"), "--format", "torchscript", "--out", str(ts), env=PLUGIN)
    assert ts.stat().st_size > 0

    # without the plugin the same commands name the unknown task instead of guessing
    bad = cli(
        "predict", str(out / "main"), "--cohort", str(out / "data"), "--out", str(tmp_path / "q.csv"), check=False
    )
    assert bad.returncode != 0 and "toy_clinical" in bad.stderr
    assert not Path(tmp_path / "q.csv").exists()
