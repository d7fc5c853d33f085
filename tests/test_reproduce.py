"""`trd-hpc reproduce`: a paper's pipeline in one directory and a table whose every figure is
read from the run's own files; a rerun skips what is finished."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli
from tests.installed import wheel_env  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

# a number, also one of "0.54..0.56"; not the digit of a name such as "F1"
NUMBER = re.compile(r"(?<!\w)(?<!\d\.)-?\d+(?:\.\d+)?(?!\w)(?!\.\d)")


def table_rows(md: str) -> list[list[str]]:
    """The first Markdown table of ``md`` as cells, header first, separator dropped."""
    rows, started = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
        elif started:
            break
    return rows


def lookup(out: Path, src: dict):
    v = json.loads((out / src["file"]).read_text())[src["key"]]
    for i in src["index"]:
        v = v[i]
    return v


def check_figures_come_from_files(out: Path, expected_labels: list[str]) -> dict:
    rep = json.loads((out / "reproduction.json").read_text())
    md_rows = table_rows((out / "reproduction.md").read_text())
    assert [r[0] for r in md_rows[1:]] == expected_labels
    assert [r["label"] for r in rep["rows"]] == expected_labels
    for cells, row in zip(md_rows[1:], rep["rows"]):
        assert cells[2] == row["ours"], (cells, row)
        assert row["sources"], row
        for src in row["sources"]:
            assert lookup(out, src) == src["value"], src  # the recorded value is the file's
        values = [s["value"] for s in row["sources"]]
        for token in NUMBER.findall(row["ours"]):
            digits = len(token.split(".")[1]) if "." in token else 0
            assert any(
                isinstance(v, (int, float)) and not isinstance(v, bool) and round(float(v), digits) == float(token)
                for v in values
            ), f"{row['label']}: {token} in {row['ours']!r} is none of the values read: {values}"
    return rep


def test_reproduce_paper001_tiny_table_from_its_files_and_a_rerun_skips_finished_stages(tmp_path):
    out = tmp_path / "rep"
    r = cli("reproduce", "paper001", "--out", str(out), "--scale", "tiny", "--quiet", timeout=1500)
    assert "stage 5/5 cv: done" in r.stdout, r.stdout
    labels = [
        "response accuracy",
        "severity MAE (0-100 scale)",
        "convergence",
        "5-fold CV accuracy, mean +- sd (min..max)",
        "5-fold CV severity MAE",
        "single-task CNN, response only",
        "single-task CNN, severity only",
        "3-D ResNet-18 (MONAI), two heads",
    ]
    rep = check_figures_come_from_files(out, labels)
    files = {s["file"] for row in rep["rows"] for s in row["sources"]}
    assert {"main/metrics.json", "cv/cv_summary.json", "main/baselines/resnet18/metrics.json"} <= files
    md = (out / "reproduction.md").read_text()
    header = table_rows(md)[0]
    test_n = json.loads((out / "main/metrics.json").read_text())["test.n"]
    assert header == [f"test set ({test_n} volumes)", "paper 001", "trd-hpc"]
    for stage in ("generate", "train", "resnet18", "evaluate", "cv"):
        assert f"| {stage} | `trd-hpc " in md, md  # each stage's command and wall time
    assert "Reductions from the paper's settings" in md
    # each run's console lines say what it trains, a baseline run by its model's name
    assert "[cnn3d] epoch 1 " in (out / "logs/train.log").read_text()
    assert "[cnn3d resnet18] epoch 1 " in (out / "logs/resnet18.log").read_text()
    assert sorted(p.name for p in (out / "logs").iterdir()) == [f"{s}.log" for s in sorted(rep["stages"])]

    # a rerun runs nothing
    weights = (out / "main/model.pt").stat().st_mtime_ns
    again = cli("reproduce", "paper001", "--out", str(out), "--scale", "tiny", "--quiet")
    assert again.stdout.count("skipped") == 5, again.stdout
    assert (out / "main/model.pt").stat().st_mtime_ns == weights

    # a lost stage output is made again, and only that stage runs (one fold retrained)
    (out / "cv/cv_summary.json").unlink()
    for p in (out / "cv/fold-4").iterdir():
        if p.name == "metrics.json":
            p.unlink()
    fold0 = (out / "cv/fold-0/metrics.json").stat().st_mtime_ns
    third = cli("reproduce", "paper001", "--out", str(out), "--scale", "tiny", "--quiet")
    assert third.stdout.count("skipped") == 4 and "stage 5/5 cv: done" in third.stdout, third.stdout
    assert (out / "cv/fold-0/metrics.json").stat().st_mtime_ns == fold0
    check_figures_come_from_files(out, labels)

    # the same directory for another scale is refused, naming the state file
    bad = cli("reproduce", "paper001", "--out", str(out), "--scale", "paper", check=False)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1, bad.stderr
    assert f"{out / 'reproduce.json'}: this directory holds the paper001 reproduction at --scale tiny" in bad.stderr


def test_reproduce_paper000_tiny_from_an_installed_wheel_and_a_failed_stage_names_its_log(tmp_path, wheel_env):
    # the first reproduction runs from a wheel installed outside the checkout, in a folder of its
    # own: its configs come from the package; the reruns below use the checkout's interpreter
    _, bin_dir = wheel_env
    out = tmp_path / "rep"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = subprocess.run(
        [str(bin_dir / "trd-hpc"), "reproduce", "paper000", "--out", str(out), "--scale", "tiny", "--quiet"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "train emt_tiny " in (out / "reproduction.md").read_text()  # the packaged config, by name
    rep = check_figures_come_from_files(
        out,
        [
            "ROC AUC",
            "average precision",
            "accuracy at 0.5, uncalibrated",
            "ECE / Brier, uncalibrated",
            "accuracy after calibration",
            "ECE after calibration",
            "convergence",
            "late-fusion MLP baseline AUC",
            "random-forest baseline AUC",
        ],
    )
    assert {s["key"] for row in rep["rows"] for s in row["sources"]} >= {
        "test.auc",
        "calibrated.platt.accuracy",
        "calibrated.isotonic.ece",
        "baselines.random_forest.auc",
    }
    # a stage killed outright (no time saved) is rerun and its row says the lost attempt was not
    # counted: the evaluate stage's outputs are removed, a rerun is killed with its process
    # group once the state file shows the stage running, and the next rerun finishes it
    (out / "main" / "report.html").unlink()
    killed = subprocess.Popen(
        [sys.executable, "-m", "trd_hpc.cli", "reproduce", "paper000", "--out", str(out), "--scale", "tiny", "--quiet"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300  # a bound on a hang, not a timing assumption
    while not json.loads((out / "reproduce.json").read_text())["stages"]["evaluate"].get("running"):
        assert killed.poll() is None and time.monotonic() < deadline, "the evaluate stage never started"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    again = cli("reproduce", "paper000", "--out", str(out), "--scale", "tiny", "--quiet", timeout=1200)
    assert again.stdout.count("skipped") == 2 and "stage 3/3 evaluate: done" in again.stdout, again.stdout
    md = (out / "reproduction.md").read_text()
    assert "s + 1 killed attempt not counted |" in md, md
    assert md.count("killed attempt") == 1 and "+ uncounted |" in md, md
    stages = json.loads((out / "reproduction.json").read_text())["stages"]
    assert stages["evaluate"]["finished"] and not stages["evaluate"].get("running")
    check_figures_come_from_files(out, [r["label"] for r in rep["rows"]])

    # a stage that fails stops the reproduction with its exit code, command and log
    other = tmp_path / "broken"
    other.mkdir()
    (other / "data").write_text("not a directory")  # generate cannot make its cohort here
    bad = cli("reproduce", "paper000", "--out", str(other), "--scale", "tiny", "--quiet", check=False)
    assert bad.returncode != 0
    assert "stage 1/3 generate failed (exit" in bad.stderr and str(other / "logs" / "generate.log") in bad.stderr
    assert not (other / "reproduction.md").exists()
    # a failed stage is not taken for a killed one: its time is kept for the rerun
    failed = json.loads((other / "reproduce.json").read_text())["stages"]["generate"]
    assert not failed.get("running") and not failed["interrupted"] and failed["seconds_before"] > 0
