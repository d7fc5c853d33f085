"""report.html of a tiny EMT and a tiny CNN run, opened in a real headless Chromium at
1280 px: it renders, nothing overflows sideways, every figure loads, and the summary (with
its bootstrap CIs), calibration and confusion tables have the shape the report promises."""

from __future__ import annotations

import json
import re

import pytest

from tests.browser import BrowserError, ensure_installed, render
from tests.conftest import CONFIGS, cli

# "0.913 [0.802, 0.990]": a value and its two CI bounds (n/a where a draw leaves it undefined)
CI_CELL = re.compile(r"^(-?\d+\.\d+|n/a) \[(-?\d+\.\d+), (-?\d+\.\d+)\]$")
DASH = "\u2014"


@pytest.fixture(scope="module")
def chromium():
    try:
        return ensure_installed(timeout=600)
    except BrowserError as e:
        pytest.skip(f"chromium unavailable, cannot check report.html in a browser: {e}")


def _train(config: str, out, *overrides: str):
    cli("train", str(CONFIGS / config), "--out", str(out), "--quiet", "train.num_threads=1", *overrides)
    return out


@pytest.fixture(scope="module")
def emt_report_run(tmp_path_factory):
    # 160 subjects: 24 in the test split, enough for the CIs (eval.metrics.MIN_CI_SUBJECTS);
    # the random forest is the quick baseline: one baseline column, no second training
    out = tmp_path_factory.mktemp("emt_report") / "run"
    return _train(
        "emt_tiny.yaml",
        out,
        "--generate",
        f"data.cohort={out.parent / 'cohort'}",
        "cohort.n_subjects=160",
        "train.max_epochs=2",
        "eval.baselines=[random_forest]",
    )


@pytest.fixture(scope="module")
def cnn_report_run(tmp_path_factory, volume_cohort_dir):
    out = tmp_path_factory.mktemp("cnn_report") / "run"
    return _train(
        "cnn3d_tiny.yaml",
        out,
        f"data.cohort={volume_cohort_dir}",
        "train.max_epochs=2",
        "eval.baselines=[single_task_severity]",
    )


@pytest.fixture(scope="module", params=["emt", "cnn"])
def rendered(request, chromium, tmp_path_factory):
    run = request.getfixturevalue(f"{request.param}_report_run")
    return request.param, run, render(chromium, run / "report.html", tmp_path_factory.mktemp("shots"))


def _table(r, kind: str) -> dict:
    found = [t for t in r.tables if t["kind"] == kind]
    assert len(found) == 1, (kind, [t["kind"] for t in r.tables])
    return found[0]


def test_report_renders_at_1280_px_with_every_figure_loaded(rendered):
    task, run, r = rendered
    png = r.screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert r.inner_width == 1280
    assert r.scroll_width <= r.inner_width, "the page scrolls sideways"
    figs = json.loads((run / "figures" / "index.json").read_text())
    assert len(r.images) == len(figs)
    for img in r.images:
        assert img["complete"] and img["naturalWidth"] > 0, img
        assert img["width"] <= r.inner_width, img


def test_summary_comes_first_with_confidence_intervals_and_the_paper(rendered):
    task, run, r = rendered
    assert r.summary_before_figures
    summary = _table(r, "summary")
    assert "95 % CI" in summary["caption"] and "bootstrap" in summary["caption"]
    header = [c["text"] for c in summary["header"]]
    assert header[1].endswith("(this run)") and header[-1] == ("paper 000" if task == "emt" else "paper 001")
    assert len(header) == 4  # metric, the run, its one baseline, the paper
    for row in summary["rows"]:
        assert row[0]["tag"] == "th"
        assert CI_CELL.match(row[1]["text"]), row  # the run's own model has every metric
        assert CI_CELL.match(row[2]["text"]) or row[2]["text"] == DASH, row
    metrics = {row[0]["text"]: row for row in summary["rows"]}
    if task == "emt":
        assert metrics["ROC AUC"][3]["text"] == "1.00"
        assert all(CI_CELL.match(c["text"]) for c in metrics["ROC AUC"][1:3])  # the forest scored too
    else:
        assert metrics["severity MAE"][3]["text"] == "8.03"
        assert metrics["response accuracy"][2]["text"] == DASH  # the severity-only baseline
        assert CI_CELL.match(metrics["severity MAE"][2]["text"])


def test_task_tables(rendered):
    task, run, r = rendered
    metrics = json.loads((run / "metrics.json").read_text())
    if task == "emt":
        import yaml

        methods = yaml.safe_load((run / "config.yaml").read_text())["eval"]["calibration"]
        cal = _table(r, "calibration")
        assert [row[0]["text"] for row in cal["rows"]] == ["uncalibrated", "Platt", "isotonic", "temperature"][
            : 1 + len(methods)
        ]
        assert [c["text"] for c in cal["header"]][:5] == ["method", "accuracy", "ECE", "Brier", "AUC"]
        assert len(_table(r, "per-class")["rows"]) == 2
    else:
        cm = _table(r, "confusion")
        assert len(cm["rows"]) == 3 and all(len([c for c in row if c["tag"] == "td"]) == 3 for row in cm["rows"])
        counts = [int(c["text"]) for row in cm["rows"] for c in row if c["tag"] == "td"]
        assert sum(counts) == metrics["test.n"]
        per_class = _table(r, "per-class")
        assert [c["text"] for c in per_class["header"]][:5] == ["class", "precision", "recall", "F1", "support"]
        assert len(per_class["rows"]) == 3


def test_report_is_rewritten_from_the_run_alone_and_deterministically(emt_report_run):
    before = (emt_report_run / "report.html").read_text()
    (emt_report_run / "report.html").unlink()
    cli("report", str(emt_report_run))
    after = (emt_report_run / "report.html").read_text()

    def stamp_free(s: str) -> str:
        return re.sub(r"generated <b>[^<]*</b>", "", s)

    assert stamp_free(after) == stamp_free(before)  # the same bootstrap draws, the same figures
