"""generate -> train -> evaluate -> report, as a user runs it, on the tiny configs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.conftest import CONFIGS, cli


@pytest.fixture(scope="module")
def emt_run(tmp_path_factory, emt_cohort_dir):
    out = tmp_path_factory.mktemp("emt_run") / "run"
    r = cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(out),
        "--quiet",
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=4",
        "train.num_threads=1",
    )
    assert "report:" in r.stdout and "test.auc" in r.stdout
    (out.parent / "train.stdout").write_text(r.stdout)
    return out


def test_console_lines_say_what_is_being_trained_and_evaluated(emt_run):
    lines = (emt_run.parent / "train.stdout").read_text().splitlines()

    def having(prefix: str) -> list[str]:
        return [ln for ln in lines if ln.startswith(prefix)]

    main = having("[emt] epoch ")
    assert len(main) == 4 and all("MFU" in ln for ln in main), lines  # the EMT's own FLOP formula
    mlp = having("[baseline late_fusion_mlp] epoch ")
    assert mlp and not any("MFU" in ln for ln in mlp), lines  # FLOPs only estimated from parameters
    assert having("[baseline late_fusion_mlp] no checkpoint yet: starting from scratch")  # resume auto
    assert having("[baseline random_forest] fit: ")
    for what in ("calibration (", "feature importance: ", "figures ...", "report: ", "bundle: "):
        assert having(f"[eval] {what}"), (what, lines)
    # every line of the training stages carries its label (the CLI's own summary comes last)
    first_summary = next(i for i, ln in enumerate(lines) if ln.startswith(("final:", "report:")))
    assert all(ln.startswith("[") for ln in lines[:first_summary] if ln.strip()), lines[:first_summary]


def test_emt_metrics_hold_test_calibration_and_baselines(emt_run):
    m = json.loads((emt_run / "metrics.json").read_text())
    for k in (
        "test.auc",
        "test.ap",
        "test.accuracy",
        "test.f1",
        "test.ece",
        "test.brier",
        "calibrated.uncalibrated.accuracy",
        "calibrated.platt.accuracy",
        "calibrated.isotonic.ece",
        "calibrated.temperature.T",
        "baselines.late_fusion_mlp.auc",
        "baselines.random_forest.auc",
        "best_epoch",
        "epochs_run",
    ):
        assert k in m, k
    # Calibration is a monotone map: Platt and temperature keep the AUC exactly ...
    assert m["calibrated.platt.auc"] == pytest.approx(m["test.auc"], abs=1e-12)
    assert m["calibrated.temperature.auc"] == pytest.approx(m["test.auc"], abs=1e-12)
    # ... and move the probabilities.
    assert m["calibrated.platt.mean_prob_pos"] != pytest.approx(m["test.mean_prob_pos"], abs=1e-6)
    assert (emt_run / "curves.json").exists() and (emt_run / "importance.json").exists()


def test_emt_importance_points_at_the_generated_effects(emt_run):
    imp = json.loads((emt_run / "importance.json").read_text())
    regions = imp["fmri_regions"]
    effect = max(regions[k] for k in regions if k != "outside_regions")
    assert effect > regions["outside_regions"]
    clin = imp["clinical"]
    shifted = np.mean([clin[k] for k in ("severity", "illness_duration", "functional_capacity")])
    others = np.mean(
        [
            v
            for k, v in clin.items()
            if k not in ("severity", "illness_duration", "episode_count", "functional_capacity", "anxiety_comorbidity")
        ]
    )
    assert shifted > others
    assert 0.0 < imp["snp"]["predictive_share"] <= 1.0


def test_emt_report_shows_figures_and_metrics(emt_run):
    html = (emt_run / "report.html").read_text()
    figs = json.loads((emt_run / "figures" / "index.json").read_text())
    assert len(figs) == 9  # with the reliability diagram
    for name in figs.values():
        assert (emt_run / "figures" / name).stat().st_size > 1000
    assert html.count('src="data:image/png;base64,') == len(figs)
    assert "test" in html and "calibrated" in html and "baselines" in html
    assert re.search(r"auc</td><td class=\"v\">[0-9.]+", html)


def test_evaluate_and_report_redo_their_parts(emt_run):
    (emt_run / "report.html").unlink()
    cli("report", str(emt_run))
    assert (emt_run / "report.html").exists()
    before = json.loads((emt_run / "metrics.json").read_text())
    cli("evaluate", str(emt_run), "--no-figures")
    after = json.loads((emt_run / "metrics.json").read_text())
    assert after["test.auc"] == before["test.auc"]
    assert after["baselines.random_forest.auc"] == before["baselines.random_forest.auc"]


def test_evaluate_takes_eval_overrides_only(emt_run):
    import yaml

    cfg_file = emt_run / "config.yaml"
    before = cfg_file.read_text()
    r = cli("evaluate", str(emt_run), "--no-figures", "train.lr=0.1", check=False)
    assert r.returncode == 2 and "train.lr=0.1" in r.stderr and "eval." in r.stderr
    assert cfg_file.read_text() == before  # refused: the run's config is untouched
    r = cli("evaluate", str(emt_run), "--no-figures", "eval.nope=1", check=False)
    assert r.returncode == 2 and "nope" in r.stderr and cfg_file.read_text() == before

    lf = emt_run / "baselines" / "late_fusion_mlp" / "metrics.json"
    stamp = lf.stat().st_mtime_ns
    cli("evaluate", str(emt_run), "--no-figures", "eval.ece_bins=5", "eval.calibration=[platt]")
    cfg = yaml.safe_load(cfg_file.read_text())
    assert cfg["eval"]["ece_bins"] == 5 and cfg["eval"]["calibration"] == ["platt"]
    assert cfg["train"] == yaml.safe_load(before)["train"]
    assert lf.stat().st_mtime_ns == stamp  # the trained baseline is reused, not retrained
    m = json.loads((emt_run / "metrics.json").read_text())
    assert "baselines.late_fusion_mlp.auc" in m and "calibrated.platt.accuracy" in m


def test_train_resume_never_refuses_to_touch_a_run(emt_run, emt_cohort_dir):
    r = cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(emt_run),
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=4",
        "--resume",
        "never",
        check=False,
    )
    assert r.returncode == 2 and "--resume never" in r.stderr


def test_train_makes_the_cohort_when_asked_to(tmp_path):
    cohort = tmp_path / "cohort"
    r = cli(
        "train",
        str(CONFIGS / "cnn3d_tiny.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        "--generate",
        f"data.cohort={cohort}",
        "cohort.n_subjects=60",
        "train.max_epochs=2",
        "train.num_threads=1",
        "eval.baselines=[single_task_response]",
    )
    assert f"data.generate: generating a synthetic cohort (paper 001 generator, seed 42, 60 subjects) at {cohort}" in (
        r.stdout
    )
    assert (cohort / "manifest.json").exists()
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    for k in (
        "test.accuracy",
        "test.severity_mae",
        "test.precision.responder",
        "test.recall.non_responder",
        "test.f1.partial_responder",
        "baselines.single_task_response.accuracy",
    ):
        assert k in m, k
    assert np.array(m["test.confusion_matrix"]).sum() == m["test.n"]
    figs = json.loads((run / "figures" / "index.json").read_text())
    assert {"Training progression", "Confusion matrix (test)"} <= set(figs)


def test_cohort_mismatch_is_refused(emt_cohort_dir, tmp_path):
    r = cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(tmp_path / "run"),
        f"data.cohort={emt_cohort_dir}",
        "cohort.seed=123",
        check=False,
    )
    assert r.returncode == 2 and "cohort.seed" in r.stderr and not (tmp_path / "run").exists()


def test_training_writes_an_offline_wandb_run_matching_metrics_jsonl(tmp_path, emt_cohort_dir):
    from trd_hpc.tracking import read_offline_run

    out = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=3",
        "train.num_threads=1",
        "tracking.group=g1",
        env={"WANDB_MODE": "offline"},
    )
    record = json.loads((out / "wandb_run.json").read_text())
    assert record["mode"] == "offline" and list((out / "wandb").glob("offline-run-*"))
    run = read_offline_run(out)
    assert run["group"] == "g1" and run["config"]["train"]["max_epochs"] == 3
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    hist = sorted(run["history"], key=lambda r: r["epoch"])
    assert [h["epoch"] for h in hist] == [r["epoch"] for r in rows]
    for h, r in zip(hist, rows):
        for k in ("train.loss", "val.loss", "val.auc", "lr"):
            assert h[k] == pytest.approx(r[k], rel=1e-12), k
    assert run["summary"]["test.auc"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test.auc"])
