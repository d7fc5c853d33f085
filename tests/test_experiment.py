"""The experiment layer and the task registry: derived configs validate again, baselines
stop on what they predict, a third task trains through the registry alone."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import CONFIGS, cli


def test_derived_configs_are_validated_again(cnn3d_tiny):
    from trd_hpc.config import ConfigError, load_config
    from trd_hpc.experiment import baseline_config, derive_config

    # a cross-key rule reapplied: the severity model cannot stop on an accuracy it never reports,
    # in the paper's config (`trd-hpc train configs/cnn3d.yaml`) as in the tiny one
    for cfg in (load_config(CONFIGS / "cnn3d.yaml"), cnn3d_tiny):
        assert cfg.train.early_stopping.monitor == "val.accuracy"
        b = baseline_config(cfg, CONFIGS / "run", "single_task_severity")
        assert (b.model.name, b.train.early_stopping.monitor, b.train.early_stopping.mode) == (
            "single_task_severity",
            "val.severity_mae",
            "min",
        )
        assert b.train.strategy == "single" and b.tracking.job_type == "baseline"
    assert cnn3d_tiny.model.name == "dual_path"  # the run's own config is left as it was
    with pytest.raises(ConfigError, match="train.lr"):
        derive_config(cnn3d_tiny, {"train.lr": -1.0})
    with pytest.raises(ConfigError, match="nope"):
        derive_config(cnn3d_tiny, {"train.nope": 1})


def test_a_run_is_labelled_by_its_task_and_by_its_model_when_that_is_not_the_tasks_own(cnn3d_tiny, emt_tiny):
    from trd_hpc.config import load_config
    from trd_hpc.train.session import default_label

    assert default_label(cnn3d_tiny) == "cnn3d" and default_label(emt_tiny) == "emt"
    for name in ("resnet18", "single_task_severity"):
        cfg = load_config(CONFIGS / "cnn3d_tiny.yaml", [f"model.name={name}"])
        assert default_label(cfg) == f"cnn3d {name}"


def test_unknown_baseline_is_refused_before_training(tmp_path, emt_cohort_dir):
    r = cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(tmp_path / "run"),
        f"data.cohort={emt_cohort_dir}",
        "eval.baselines=[resnet18]",
        check=False,
    )
    assert r.returncode == 2 and "resnet18" in r.stderr and "late_fusion_mlp" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_baselines_stop_on_their_own_target_and_restore_their_best_weights(tmp_path, volume_cohort_dir):
    """A default `trd-hpc train configs/cnn3d*.yaml` with baselines: each baseline's early
    stopping follows a metric it reports, so it has a best epoch and ends on its weights."""
    run = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "cnn3d_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        f"data.cohort={volume_cohort_dir}",
        "train.max_epochs=3",
        "train.num_threads=1",
        "eval.baselines=[single_task_response,single_task_severity,resnet18]",
    )
    want = {
        "single_task_response": "val.accuracy",
        "single_task_severity": "val.severity_mae",
        "resnet18": "val.accuracy",
    }
    main = json.loads((run / "metrics.json").read_text())
    for name, monitor in want.items():
        d = run / "baselines" / name
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["train"]["early_stopping"]["monitor"] == monitor, name
        m = json.loads((d / "metrics.json").read_text())
        history = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert all(monitor in row for row in history), name
        assert m["best_epoch"] >= 1, name
        # the final validation metrics are those of the best epoch's weights, restored
        assert m[monitor] == history[m["best_epoch"] - 1][monitor], name
        assert f"baselines.{name}.{monitor.removeprefix('val.')}" in main
    assert "baselines.single_task_severity.accuracy" not in main  # scored on its own target only


@pytest.fixture
def toy_spec():
    from tests import toy_task
    from trd_hpc import tasks

    return tasks.register(toy_task.SPEC)


def test_a_third_task_trains_through_the_registry_alone(toy_spec, emt_tiny, emt_cohort_dir, tmp_path):
    from trd_hpc import experiment, tasks
    from trd_hpc.config import to_dict, validate_experiment

    assert "toy_clinical" in tasks.names()
    cfg = validate_experiment(
        {
            "task": "toy_clinical",
            "cohort": to_dict(emt_tiny.cohort),
            "data": {"cohort": str(emt_cohort_dir), "num_workers": 0},
            "train": {
                "max_epochs": 3,
                "batch_size": 8,
                "num_threads": 1,
                "lr": 0.05,
                "plateau": {"monitor": "val.loss", "mode": "min"},
                "early_stopping": {"monitor": "val.loss", "mode": "min"},
            },
        },
        "toy",
    )
    assert type(cfg).__name__ == "ToyExperiment"
    m = experiment.train(cfg, tmp_path / "run", progress=False)
    assert m["epochs_run"] == 3 and 0.0 <= m["test.accuracy"] <= 1.0 and m["best_epoch"] >= 1
    run = tmp_path / "run"
    assert "Toy: TRD from clinical variables alone" in (run / "report.html").read_text()
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3] and all("val.accuracy" in r for r in history)
    # it resumes like any run: a finished run resumed is left as it was
    again = experiment.train(cfg, run, resume="auto", progress=False)
    assert again["test.accuracy"] == m["test.accuracy"]


def test_a_third_cohort_kind_generates_validates_and_loads_through_the_registry_alone(tmp_path):
    import numpy as np

    from tests import toy_cohort
    from trd_hpc.data import kinds
    from trd_hpc.data.dataset import CohortDataset
    from trd_hpc.data.generate import generate
    from trd_hpc.data.validate import validate_cohort_dir

    kinds.register(toy_cohort.KIND)
    cfg = toy_cohort.TableCohortConfig(n_subjects=60, subjects_per_shard=16)
    res = generate(cfg, tmp_path / "c", progress=False)
    assert res.finalized and len(res.made) == 4
    assert validate_cohort_dir(tmp_path / "c", deep=True, progress=False) == []
    ds = CohortDataset(tmp_path / "c", "all")
    b = ds.__getitems__(list(range(len(ds))))
    assert b["features"].shape == (60, toy_cohort.N_FEATURES)
    assert np.array_equal(b["label"].numpy(), (b["features"].sum(1) > 0).numpy().astype(np.int64))
    assert np.array_equal(b["features"][7].numpy(), toy_cohort._features(cfg, 7))
    ds.close()
