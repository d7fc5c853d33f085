"""Ray Tune sweeps (trd_hpc.tune) on a real local Ray: ASHA stops trials early, the best
config trains as is, a sweep whose driver is killed resumes without repeating epochs.

The trials are tiny 3-D CNN runs (configs/cnn3d_tiny.yaml) scored on val.loss, which
changes with the learning rate from the first epoch on (val.accuracy stays at the
majority class for the first epochs of this tiny cohort).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, REPO, cli

ray = pytest.importorskip("ray", reason="ray[tune] is not installed (pip install -e '.[tune]')")

from trd_hpc.config import ConfigError, load_config  # noqa: E402
from trd_hpc.tune.spec import load_spec  # noqa: E402

OBJECT_STORE = 80 * 1024 * 1024


def write_spec(path: Path, **kw) -> Path:
    spec = {
        "base": str(CONFIGS / "cnn3d_tiny.yaml"),
        "metric": "val.loss",
        "mode": "min",
        "scheduler": "asha",
        "max_t": 4,
        "grace_period": 1,
        "reduction_factor": 2,
        "num_samples": 6,
        "resources_per_trial": {"cpu": 1},
        "max_concurrent": 1,  # one trial at a time: ASHA's decisions do not depend on timing
        "space": {
            "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "train.grad_clip_norm": {"type": "uniform", "low": 0.5, "high": 2.0},
        },
        "overrides": ["train.early_stopping.patience=100", "tracking.wandb=false"],
        "seed": 0,
    }
    spec.update(kw)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def epochs_of(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def trial_runs(out: Path) -> dict[str, list[int]]:
    return {p.parent.name: epochs_of(p.parent / "run") for p in sorted(out.glob("sweep/*/trial.json"))}


@pytest.fixture(scope="module")
def local_ray():
    # address="local": never join a `ray start` cluster left on this machine (e.g. by the SLURM test);
    # trials at normal priority, as `trd-hpc tune` runs them (a niced trial crawls next to a busy CPU)
    from trd_hpc.tune.sweep import use_normal_priority_for_trials

    use_normal_priority_for_trials()
    ray.init(
        address="local", num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False, log_to_driver=False
    )
    yield
    ray.shutdown()


# --------------------------------------------------------------------------- specs (no Ray)
@pytest.mark.parametrize("name", ["cnn3d_grid.yaml", "cnn3d_asha.yaml", "cnn3d_tpe.yaml", "emt_asha.yaml"])
def test_shipped_specs_check_against_their_base(name):
    sw = load_spec(REPO / "tune" / name)
    if name == "cnn3d_grid.yaml":
        assert (sw.spec.scheduler, sw.spec.num_trials) == ("fifo", 36)
        assert set(sw.spec.space) == {"train.lr", "loss.focal_alpha", "loss.focal_gamma", "train.grad_clip_norm"}
    if name == "cnn3d_asha.yaml":
        assert (sw.spec.scheduler, sw.spec.num_trials, sw.spec.search_name) == ("asha", 36, "random")
    if name == "cnn3d_tpe.yaml":  # the random spec's space and ASHA, trials drawn by TPE
        assert (sw.spec.scheduler, sw.spec.num_trials, sw.spec.search_name) == ("asha", 36, "optuna-tpe")
        random = load_spec(REPO / "tune" / "cnn3d_asha.yaml").spec
        assert sw.spec.space == random.space and sw.spec.reduction_factor == random.reduction_factor
    if name == "emt_asha.yaml":  # every width/heads pair of the space is a valid model
        assert {"model.d_model", "model.n_heads", "model.n_layers"} <= set(sw.spec.space)


@pytest.mark.parametrize(
    "change, words",
    [
        (
            {"space": {"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}},
            ["train.lrr", "valid keys under 'train'", "lr"],
        ),
        ({"space": {"train.lr": {"type": "uniform", "low": 0.2, "high": 0.1}}}, ["space.train.lr", "below"]),
        ({"space": {"train.lr": {"type": "uniform", "lo": 0.1, "high": 0.2}}}, ["space.train.lr.lo", "low"]),
        ({"space": {"model.dense": {"type": "choice", "values": [16, -1]}}}, ["model.dense", "-1"]),
        ({"schedular": "asha"}, ["schedular", "scheduler"]),
        ({"metric": "test.accuracy"}, ["metric", "val."]),
        ({"overrides": ["train.foo=1"]}, ["train.foo"]),
        ({"grace_period": 9}, ["grace_period", "max_t"]),
        ({"search": {"algorithm": "bohb"}}, ["search.algorithm", "optuna"]),
        ({"search": {"algorithm": "optuna", "sampler": "cmaes"}}, ["search.sampler", "tpe"]),
        ({"search": {"algorithm": "random", "n_startup_trials": 5}}, ["n_startup_trials", "algorithm: optuna"]),
        ({"search": {"algorithm": "optuna", "n_startup_trials": 0}}, ["search.n_startup_trials"]),
        ({"search": {"algorithm": "optuna", "storage": "journal"}}, ["search", "journal", "path"]),
        ({"search": {"algorithm": "optuna", "path": "study.log"}}, ["search", "path", "storage: journal"]),
        (
            {"search": {"algorithm": "optuna"}, "space": {"train.lr": {"type": "grid", "values": [0.1, 0.2]}}},
            ["search: optuna", "train.lr", "type: choice"],
        ),
    ],
)
def test_bad_specs_name_the_key(tmp_path, change, words):
    with pytest.raises(ConfigError) as e:
        load_spec(write_spec(tmp_path / "s.yaml", **change))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_tie_breaker_only_orders_equal_values():
    from trd_hpc.tune.spec import TieBreaker, score

    tie = TieBreaker(metric="val.severity_mae", mode="min")
    a = {"val.accuracy": 0.55, "val.severity_mae": 12.0}
    b = {"val.accuracy": 0.55, "val.severity_mae": 30.0}
    c = {"val.accuracy": 0.58, "val.severity_mae": 90.0}
    assert score(a, "val.accuracy", "max", tie) > score(b, "val.accuracy", "max", tie)  # tie: lower error wins
    assert score(c, "val.accuracy", "max", tie) > score(a, "val.accuracy", "max", tie)  # the metric decides first
    assert score(a, "val.accuracy", "max", None) == 0.55
    assert abs(score(a, "val.accuracy", "max", tie) - 0.55) < 1e-6
    assert score({"val.accuracy": float("nan")}, "val.accuracy", "max", tie) is None


def test_cli_parsers():
    from trd_hpc.cli import build_parser

    p = build_parser()
    # trd_hpc.cli.main parses known args and appends the KEY=VALUE extras to `overrides`
    a, extra = p.parse_known_args(
        ["tune", "tune/cnn3d_asha.yaml", "--out", "x", "--address", "auto", "--scheduler", "fifo", "train.lr=0.1"]
    )
    assert (a.func.__name__, a.spec, a.address, a.scheduler) == ("_tune", "tune/cnn3d_asha.yaml", "auto", "fifo")
    assert a.overrides + extra == ["train.lr=0.1"]
    assert p.parse_args(["tune", "s.yaml", "--out", "x", "--seed", "3"]).seed == 3  # one per SLURM array task
    a = p.parse_args(["bench", "tune", "--base", "configs/cnn3d_tiny.yaml", "--max-t", "3"])
    assert (a.base, a.max_t, a.spec_grid) == ("configs/cnn3d_tiny.yaml", 3, "cnn3d_grid")  # packaged, by name
    # --config and --dir, as the other benchmarks call them
    a, extra = p.parse_known_args(
        ["bench", "tune", "--config", "configs/cnn3d_tiny.yaml", "--spec-asha", "s.yaml", "--dir", "d", "a.b=1"]
    )
    assert (a.base, a.spec_asha, a.out, a.overrides + extra) == ("configs/cnn3d_tiny.yaml", "s.yaml", "d", ["a.b=1"])
    # each benchmark has its own options only
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "train", "--spec-grid", "g.yaml"])
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "load", "--kills", "3"])


# --------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def asha_and_fifo(local_ray, volume_cohort_dir, tmp_path_factory):
    from trd_hpc.tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("tune")
    spec = write_spec(root / "spec.yaml")
    over = [f"data.cohort={volume_cohort_dir}"]
    asha = run_sweep(spec, root / "asha", overrides=over, verbose=0, progress=False)
    fifo = run_sweep(spec, root / "fifo", scheduler="fifo", overrides=over, verbose=0, progress=False)
    return root, asha, fifo


def test_sweep_logs_every_result_of_every_trial_through_the_tracker(
    local_ray, volume_cohort_dir, tmp_path, monkeypatch
):
    """The driver logs each trial through the same Tracker a run uses (trd_hpc/tune/tracking.py):
    W&B offline and MLflow each get every epoch of every trial, in order, Ray's bookkeeping left
    out; the trials' own trainers log to neither (a trial stopped by ASHA would lose its tail)."""
    from trd_hpc.tracking import read_offline_run
    from trd_hpc.tracking.mlflow_logger import MlflowLogger
    from trd_hpc.tune.sweep import run_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = write_spec(
        tmp_path / "spec.yaml",
        scheduler="fifo",
        max_t=3,
        num_samples=2,
        overrides=["train.early_stopping.patience=100", "tracking.mlflow=true"],
    )
    run_sweep(spec, tmp_path / "out", overrides=[f"data.cohort={volume_cohort_dir}"], verbose=0, progress=False)
    trials = sorted((tmp_path / "out" / "sweep").glob("trial_*/"))
    assert len(trials) == 2, trials
    for t in trials:
        w = read_offline_run(t / "tracking")
        assert w["job_type"] == "tune" and w["group"] == "out", w
        assert [row["epoch"] for row in w["history"]] == [1, 2, 3], w["history"]
        assert all("val.loss" in row and "training_iteration" not in row for row in w["history"])
        own = [json.loads(line)["val.loss"] for line in (t / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [row["val.loss"] for row in w["history"]] == pytest.approx(own)
        ml = MlflowLogger.read_back(t / "tracking")
        assert [row["epoch"] for row in ml["history"]] == [1, 2, 3]
        assert [row["val.loss"] for row in ml["history"]] == pytest.approx(own)
        assert not (t / "run" / "mlflow_run.json").exists() and not (t / "run" / "wandb").exists()


def test_bench_tune_judges_each_seed_of_the_model_based_search_alone(local_ray, tmp_path):
    """bench tune against a grid: ASHA with Optuna's TPE once per search seed, on a validation split
    made bigger; each seed gets its own verdict (within 1 point of the grid's best with <= 1/3 of
    its trial-epochs), and the bench says in how many seeds it held."""
    from trd_hpc.data.manifest import load_manifest
    from trd_hpc.tune.bench import format_bench, run_bench

    over = ["train.early_stopping.patience=100", "tracking.wandb=false"]
    acc = {"metric": "val.accuracy", "mode": "max"}  # a metric with a target (within 1 point)
    grid = write_spec(
        tmp_path / "grid.yaml", scheduler="fifo", max_t=2, num_samples=1, overrides=over,
        space={"train.lr": {"type": "grid", "values": [0.001, 0.003]}}, **acc,
    )  # fmt: skip
    tpe = {"algorithm": "optuna", "sampler": "tpe", "n_startup_trials": 1}
    asha = write_spec(tmp_path / "asha.yaml", max_t=2, num_samples=2, overrides=over, search=tpe, **acc)
    res = run_bench(
        grid, asha, tmp_path / "bench", overrides=[f"data.cohort={tmp_path / 'cohort'}"], seeds=2, val_subjects=60
    )
    # the bench cohort: 60 validation subjects, the training split of the base config (173)
    m = load_manifest(tmp_path / "cohort")
    assert (len(m.subjects("val")), len(m.subjects("train"))) == (60, 173) and res["val_subjects"] == 60
    assert res["search"] == "optuna-tpe"
    seeds, g = res["asha_seeds"], res["grid"]
    assert [s["seed"] for s in seeds] == [0, 1] and (tmp_path / "bench" / "asha-seed1" / "best.json").exists()
    for s in seeds:  # each seed alone, from its own sweep's figures
        own = json.loads((tmp_path / "bench" / ("asha" if s["seed"] == 0 else "asha-seed1") / "best.json").read_text())
        assert (s["best"], s["trial_epochs"], own["search"]) == (own["value"], own["trial_epochs"], "optuna-tpe")
        assert s["epoch_ratio"] == pytest.approx(s["trial_epochs"] / g["trial_epochs"])
        assert s["behind_grid"] == pytest.approx(g["value"] - s["best"])
        assert s["holds"] is (s["best"] >= g["value"] - 0.01 and s["trial_epochs"] <= g["trial_epochs"] / 3)
    held = sum(s["holds"] for s in seeds)
    assert (res["targets"]["seeds_holding"], res["targets"]["seeds"], res["targets"]["every_seed"]) == (
        held,
        2,
        held == 2,
    )
    o = res["asha_over_seeds"]
    assert o["trial_epochs"]["mean"] == pytest.approx(sum(s["trial_epochs"] for s in seeds) / 2)
    text = format_bench(res)
    assert f"held in {held} of 2 seeds" in text and "one subject = 1.67 points" in text
    assert "ASHA seed 0" in text and "ASHA seed 1" in text and "optuna-tpe" in text


def test_asha_stops_trials_early(asha_and_fifo):
    root, asha, fifo = asha_and_fifo
    for res, name in ((asha, "asha"), (fifo, "fifo")):
        assert res["finished"] and res["num_trials"] == 6, res
        assert json.loads((root / name / "sweep_state.json").read_text())["finished"] is True
        runs = trial_runs(root / name)
        assert len(runs) == 6
        for epochs in runs.values():
            assert epochs == list(range(1, len(epochs) + 1)) and 1 <= len(epochs) <= 4
        assert res["trial_epochs"] == sum(len(e) for e in runs.values())
    assert fifo["trial_epochs"] == 6 * 4 and fifo["stopped_early"] == 0
    assert asha["stopped_early"] >= 1
    assert asha["trial_epochs"] < fifo["trial_epochs"]
    # the same seed samples the same 6 configurations under both schedulers
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in asha["trials"]) == sorted(
        json.dumps(t["params"], sort_keys=True) for t in fifo["trials"]
    )
    # best.json points at the trial whose run has the best val.loss of all epochs
    best = json.loads((root / "asha" / "best.json").read_text())
    rows = [json.loads(line) for line in (Path(best["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert best["value"] == pytest.approx(min(r["val.loss"] for r in rows))
    for res in (asha, fifo):
        for t in res["trials"]:
            assert t["best_value"] >= res["value"] - 1e-12


def test_best_config_trains_as_is(asha_and_fifo, tmp_path):
    root, asha, _ = asha_and_fifo
    best_cfg = root / "asha" / "best_config.yaml"
    cfg = load_config(best_cfg)
    assert cfg.train.lr == pytest.approx(asha["params"]["train.lr"])
    assert cfg.train.grad_clip_norm == pytest.approx(asha["params"]["train.grad_clip_norm"])
    assert Path(cfg.data.cohort).is_absolute()
    out = tmp_path / "retrain"
    r = cli("train", str(best_cfg), "--out", str(out), "train.max_epochs=1", "--no-eval", "--quiet")
    assert "final:" in r.stdout
    assert epochs_of(out) == [1]


def test_killed_sweep_resumes_without_repeating_epochs(local_ray, volume_cohort_dir, tmp_path):
    spec = write_spec(
        tmp_path / "spec.yaml",
        scheduler="fifo",
        max_t=6,
        num_samples=4,
        max_concurrent=2,
        space={"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        overrides=["train.early_stopping.patience=100", "tracking.wandb=false", "train.batch_size=2"],
    )
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "trd_hpc.cli",
        "tune",
        str(spec),
        "--out",
        str(out),
        "--quiet",
        f"data.cohort={volume_cohort_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    log = tmp_path / "first.log"

    def reported() -> int:
        return sum(len(e) for e in trial_runs(out).values())

    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while reported() < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert reported() >= 3, f"no progress in time:\n{log.read_text()[-3000:]}"
        os.kill(first.pid, signal.SIGKILL)  # the driver only, mid-sweep
        first.wait(timeout=30)
        state = json.loads((out / "sweep_state.json").read_text())
        assert state["finished"] is False
        at_kill = trial_runs(out)
        assert sum(len(e) for e in at_kill.values()) < 4 * 6

        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        try:  # what is left of the killed driver's Ray (same session as the driver)
            os.killpg(first.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    state = json.loads((out / "sweep_state.json").read_text())
    assert state["finished"] is True and state["invocations"] == 2
    runs = trial_runs(out)
    assert len(runs) == 4
    for name, epochs in runs.items():
        assert epochs == [1, 2, 3, 4, 5, 6], (name, epochs)  # strictly 1..n: nothing trained twice
        assert epochs[: len(at_kill.get(name, []))] == at_kill.get(name, [])
    best = json.loads((out / "best.json").read_text())
    assert best["trial_epochs"] == 4 * 6 and best["num_trials"] == 4 and best["finished"] is True
    load_config(out / "best_config.yaml")


def _by_params(out: Path) -> dict[str, list[int]]:
    """Each trial's trained epochs, keyed by its sampled params (trial ids differ between sweeps)."""
    runs = {}
    for tf in sorted(out.glob("sweep/*/trial.json")):
        runs[json.dumps(json.loads(tf.read_text())["params"], sort_keys=True)] = epochs_of(tf.parent / "run")
    return runs


def _rungs_by_params(out: Path) -> list[dict]:
    """rungs.json's milestones, each trial's recorded value keyed by its params."""
    params = {
        json.loads(tf.read_text())["trial_id"]: json.dumps(json.loads(tf.read_text())["params"], sort_keys=True)
        for tf in out.glob("sweep/*/trial.json")
    }
    (bracket,) = json.loads((out / "rungs.json").read_text())["brackets"]
    return [{"milestone": m, "values": {params[t]: v for t, v in rec.items()}} for m, rec in bracket]


def test_asha_sweep_requeued_mid_rung_prunes_the_same_trials(asha_and_fifo, volume_cohort_dir, tmp_path):
    """Pre-emption mid-rung: the driver (and its Ray) die at the 8th trial result, when the first
    rung holds some trials' results and not others'; the same command restores the sweep. Ray's
    own restore brings ASHA back with empty rungs; ours (trd_hpc/tune/rungs.py) carries them, so
    the restored sweep stops the same trials at the same epochs as the uninterrupted one of the
    same seed (the asha_and_fifo fixture's), with the same rung records."""
    root, asha, _ = asha_and_fifo
    spec = write_spec(tmp_path / "spec.yaml")  # the fixture's spec: 6 trials, max_t 4, rungs at 1, 2, 4
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "trd_hpc.cli", "tune", str(spec), "--out", str(out), "--quiet"]
    cmd.append(f"data.cohort={volume_cohort_dir}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    log = tmp_path / "first.log"
    # the whole process group, as SLURM kills a pre-empted job's processes (Ray's included)
    killed = {**env, "TRD_FAULT": "tune-result:8", "TRD_FAULT_KILL": "group"}
    first = subprocess.Popen(
        cmd, cwd=REPO, env=killed, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        first.wait(timeout=300)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert "TRD_FAULT: dying at tune-result:8" in log.read_text(), log.read_text()[-3000:]
    assert json.loads((out / "sweep_state.json").read_text())["finished"] is False
    (first_rung,) = [rec for m, rec in json.loads((out / "rungs.json").read_text())["brackets"][0] if m == 1]
    assert 0 < len(first_rung) < 6, first_rung  # mid-rung: some trials' first epochs decided, not all

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    res = json.loads((out / "best.json").read_text())
    assert res["finished"] and res["num_trials"] == 6
    reference = _by_params(root / "asha")
    assert _by_params(out) == reference  # the same trials stopped after the same epochs
    assert res["trial_epochs"] == asha["trial_epochs"] and res["stopped_early"] == asha["stopped_early"]
    assert _rungs_by_params(out) == _rungs_by_params(root / "asha")


@pytest.mark.ray
def test_two_tune_processes_share_one_optuna_journal(volume_cohort_dir, tmp_path):
    """Two `trd-hpc tune` processes (as two SLURM array tasks: their own --out and --seed, their
    own Ray) run at once on one Optuna journal file: both append their trials to the same study,
    and each process then sees the other's trials in it."""
    optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[tune]')")
    journal = tmp_path / "shared" / "study.journal"
    spec = write_spec(
        tmp_path / "spec.yaml",
        scheduler="fifo",
        max_t=1,
        num_samples=2,
        search={"algorithm": "optuna", "n_startup_trials": 1, "storage": "journal", "path": str(journal)},
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def cmd(task: int) -> list[str]:
        out = tmp_path / f"task{task}"
        return [sys.executable, "-m", "trd_hpc.cli", "tune", str(spec), "--out", str(out), "--seed", str(task)] + [
            "--quiet",
            f"data.cohort={volume_cohort_dir}",
        ]

    procs = [
        subprocess.Popen(cmd(t), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for t in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    study = optuna.load_study(
        study_name="spec",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), trials
    for task in (0, 1):
        out = tmp_path / f"task{task}"
        mine = [t for t in trials if t.user_attrs["sweep"] == str(out)]
        # what each process told the study is what its trials trained: one epoch's val.loss each
        runs = {
            json.dumps(json.loads(tf.read_text())["params"], sort_keys=True): tf.parent
            for tf in out.glob("sweep/*/trial.json")
        }
        assert len(mine) == 2 and len(runs) == 2
        for t in mine:
            (row,) = [
                json.loads(line)
                for line in (runs[json.dumps(t.params, sort_keys=True)] / "run" / "metrics.jsonl")
                .read_text()
                .splitlines()
            ]
            assert t.value == pytest.approx(row["val.loss"])
        # the same command again: the sweep has finished, and its process reads the shared study
        again = subprocess.run(cmd(task), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"study 'spec' in {journal}: 4 trials (4 finished), 2 of them this sweep's" in again.stdout, again.stdout
        st = json.loads((out / "best.json").read_text())["study"]
        assert st["sweeps"] == sorted([str(tmp_path / "task0"), str(tmp_path / "task1")])


# --------------------------------------------------------------------------- SLURM
def _trd_hpc_command(tmp_path: Path) -> str:
    """``trd-hpc`` when its `tune` command is wired, else a stand-in with the same arguments."""
    from trd_hpc.cli import build_parser

    venv_bin = Path(sys.executable).parent
    try:
        args, _ = build_parser().parse_known_args(["tune", "spec.yaml", "--out", "x"])
        if getattr(args, "spec", None) == "spec.yaml":
            return str(venv_bin / "trd-hpc")
    except SystemExit:
        pass
    stand_in = tmp_path / "trd-hpc"
    stand_in.write_text(f'#!/bin/sh\n[ "$1" = tune ] && shift\nexec {sys.executable} -m trd_hpc.cli tune "$@"\n')
    stand_in.chmod(0o755)
    return str(stand_in)


@pytest.mark.slurm
def test_slurm_script_runs_a_sweep_on_its_ray_cluster(slurm_cluster, volume_cohort_dir, tmp_path):
    spec = write_spec(
        tmp_path / "spec.yaml",
        scheduler="fifo",
        max_t=2,
        num_samples=2,
        max_concurrent=2,
        space={"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
    )
    out, log = tmp_path / "out", tmp_path / "job.out"
    venv_bin = Path(sys.executable).parent
    env = {
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "TRD_HPC": _trd_hpc_command(tmp_path),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "RAY_OBJECT_STORE_BYTES": str(OBJECT_STORE),
    }
    job = slurm_cluster.sbatch(
        [
            "--nodes=1",
            f"--cpus-per-task={slurm_cluster.cpus}",
            "--mem-per-cpu=1G",
            f"--output={log}",
            "slurm/tune.sh",
            str(spec),
            str(out),
            "--quiet",
            f"data.cohort={volume_cohort_dir}",
        ],
        cwd=REPO,
        env=env,
        wait=True,
        timeout=300,
    )
    text = log.read_text() if log.exists() else "(no log)"
    assert slurm_cluster.job_state(job) == "COMPLETED", text[-4000:]
    assert "ray head on" in text and "auth token" in text, text[-4000:]
    state = json.loads((out / "sweep_state.json").read_text())
    assert state["finished"] is True, text[-4000:]
    assert list(trial_runs(out).values()) == [[1, 2], [1, 2]]
    load_config(out / "best_config.yaml")


def test_a_restored_trial_with_another_sample_continues_the_run_it_started(tmp_path):
    """What a driver killed between Ray's snapshots can bring back: the trial's run directory holds
    a run of one sample while Ray hands it the next one."""
    from trd_hpc.tune.trial import TRIAL_FILE, recorded_params

    trial = tmp_path / "trial_x_00000"
    fresh = {"train.lr": 0.002}
    assert recorded_params(trial, fresh) == fresh  # a new trial
    (trial / "run").mkdir(parents=True)
    (trial / TRIAL_FILE).write_text(json.dumps({"params": {"train.lr": 0.001}}))
    assert recorded_params(trial, fresh) == fresh  # trial.json written, but no run started yet
    (trial / "run" / "config.yaml").write_text("train: {lr: 0.001}\n")
    assert recorded_params(trial, fresh) == {"train.lr": 0.001}
    assert recorded_params(trial, {"train.lr": 0.001}) == {"train.lr": 0.001}
