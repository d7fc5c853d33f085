"""W&B tracking (offline, real wandb runs written under a run directory and read back
from disk) and ``trd-hpc compare`` on run directories."""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, cli
from trd_hpc.config import load_config, to_yaml

FAKE_KEY = "local-0123456789abcdef0123456789abcdef0123456789abcdef"
WANDB_ENV = (
    "WANDB_MODE",
    "WANDB_DISABLED",
    "WANDB_API_KEY",
    "WANDB_DIR",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_PROJECT",
    "WANDB_RUN_GROUP",
    "WANDB_JOB_TYPE",
    "WANDB_TAGS",
    "WANDB_NAME",
)


def _isolate(mp: pytest.MonkeyPatch, home: Path) -> None:
    for k in WANDB_ENV:
        mp.delenv(k, raising=False)
    for k, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        mp.setenv(k, str(home / sub))


@pytest.fixture(autouse=True)
def wandb_env(monkeypatch, tmp_path_factory):
    from trd_hpc import tracking

    _isolate(monkeypatch, tmp_path_factory.getbasetemp() / "wandb-home")
    tracking._said.clear()  # each test sees the "once" messages


def _cfg(*overrides: str):
    return load_config(CONFIGS / "emt_tiny.yaml", list(overrides))


def _rows(n: int = 3) -> list[dict]:
    """Rows shaped like the trainer's (one NaN to check it survives the round trip)."""
    rows = []
    for e in range(1, n + 1):
        rows.append(
            {
                "epoch": e,
                "step": 6 * e,
                "lr": 0.001,
                "train.loss": 0.5 / e,
                "train.auc": 0.9 + e / 100,
                "val.loss": 0.4 / e,
                "val.auc": math.nan if e == 2 else 0.8 + e / 50,
                "seconds": 0.1 * e,
                "best_epoch": 1 if e < 3 else 3,
            }
        )
    return rows


def _write_jsonl(run_dir: Path, rows: list[dict]) -> None:
    # exactly as Trainer._write_history
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _figure(path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


SUMMARY = {
    "test.auc": 0.875,
    "test.ap": 0.8,
    "test.accuracy": 0.75,
    "calibrated.platt.accuracy": 0.7,
    "baselines.random_forest.auc": 0.66,
    "best_epoch": 3,
    "epochs_run": 3,
    "strategy": "single",
    "test.ece": None,
}


# ---------------------------------------------------------------------------- one logged run
@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A real offline W&B run written by Tracker, with a fake API key in the environment."""
    pytest.importorskip("wandb")
    from trd_hpc.tracking import Tracker, read_offline_run

    run_dir = tmp_path_factory.mktemp("tracked") / "emt-run"
    cfg = _cfg("tracking.group=sweep-a", "tracking.tags=[tiny,test]")
    rows = _rows()
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.getbasetemp() / "wandb-home")
        mp.setenv("WANDB_API_KEY", FAKE_KEY)
        tracker = Tracker.start(cfg, run_dir, rank=0)
        assert tracker.enabled, tracker.reason
        for r in rows:
            tracker.log_epoch(r)
        _write_jsonl(run_dir, rows)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        tracker.log_summary(SUMMARY)
        tracker.log_figures({"roc": _figure(run_dir / "figures" / "roc.png")})
        tracker.finish()
        back = read_offline_run(run_dir)
    return {"run_dir": run_dir, "cfg": cfg, "rows": rows, "tracker": tracker, "back": back}


def test_offline_run_is_written_in_the_run_dir_and_reads_back(logged):
    run_dir, back = logged["run_dir"], logged["back"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    rec = json.loads((run_dir / "wandb_run.json").read_text())
    assert rec["id"] == back["id"] == logged["tracker"].id
    assert rec["mode"] == "offline" and rec["mode_from"] == "tracking.mode"
    assert (run_dir / rec["directory"]).resolve() == offline[0].resolve()
    assert rec["project"] == back["project"] == "trd-hpc"
    assert back["group"] == "sweep-a" and back["job_type"] == "train" and back["tags"] == ["tiny", "test"]
    assert back["state"] == "finished"

    # history == metrics.jsonl, row by row, value by value (NaN included)
    jsonl = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in back["history"] if "epoch" in r]
    assert len(epochs) == len(jsonl) == 3
    for got, want in zip(epochs, jsonl):
        assert set(got) == set(want)
        assert all(_same(got[k], want[k]) for k in want), (got, want)

    # summary: the final metrics (None left out), config: the resolved config
    for k, v in SUMMARY.items():
        if v is None:
            assert k not in back["summary"]
        else:
            assert back["summary"][k] == v
    assert back["config"] == json.loads(json.dumps(logged["cfg"].model_dump(mode="json")))

    # the figure: its own step after the last epoch, the PNG copied into the offline run
    fig_rows = [r for r in back["history"] if "figures/roc._type" in r]
    assert len(fig_rows) == 1 and fig_rows[0]["figures/roc._type"] == "image-file"
    assert list((offline[0] / "files" / "media" / "images").rglob("*.png"))


def test_api_key_never_written(logged):
    run_dir = logged["run_dir"]
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 5
    key = FAKE_KEY.encode()
    leaked = [str(p) for p in files if key in p.read_bytes() or key[6:] in p.read_bytes()]
    assert not leaked, f"API key found in {leaked}"


# ---------------------------------------------------------------------------- mode, no-op, resume
def test_user_wandb_mode_wins_over_config(tmp_path, monkeypatch, capfd):
    from trd_hpc.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker.start(_cfg("tracking.mode=offline"), tmp_path / "a", rank=0)
    assert not t.enabled and "WANDB_MODE=disabled" in t.reason
    t.log_epoch({"epoch": 1, "val.auc": 0.5})
    t.finish()
    assert not (tmp_path / "a").exists()
    assert "WANDB_MODE=disabled" in capfd.readouterr().err

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    t = Tracker.start(_cfg("tracking.mode=disabled"), tmp_path / "b", rank=0)
    assert t.enabled
    t.finish()
    rec = json.loads((tmp_path / "b" / "wandb_run.json").read_text())
    assert rec["mode"] == "offline" and rec["mode_from"] == "WANDB_MODE"
    assert list((tmp_path / "b" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_noop_tracker_writes_nothing(tmp_path, monkeypatch, capfd):
    from trd_hpc import tracking
    from trd_hpc.tracking import Tracker

    png = _figure(tmp_path / "fig.png")
    cases = [
        ("rank", _cfg(), 1),
        ("off", _cfg("tracking.wandb=false"), 0),
        ("cfg-disabled", _cfg("tracking.mode=disabled"), 0),
    ]
    for name, cfg, rank in cases:
        rd = tmp_path / name
        t = Tracker.start(cfg, rd, rank=rank)
        assert not t.enabled and t.id is None
        t.log_epoch({"epoch": 1, "val.auc": 0.5})
        t.log_summary({"test.auc": 0.5})
        t.log_figures({"roc": png})
        t.finish()
        assert not rd.exists(), name
    err = capfd.readouterr().err
    assert "tracking.wandb is false" in err and "tracking.mode=disabled" in err
    assert "rank" not in err  # other ranks are silent

    # wandb missing: one line saying so, nothing written
    tracking._said.clear()
    monkeypatch.setitem(sys.modules, "wandb", None)
    t = Tracker.start(_cfg(), tmp_path / "nowandb", rank=0)
    assert not t.enabled and "not installed" in t.reason
    t.finish()
    assert not (tmp_path / "nowandb").exists()
    Tracker.start(_cfg(), tmp_path / "nowandb", rank=0)
    assert capfd.readouterr().err.count("not installed") == 1


def test_resume_continues_the_same_run(tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    from trd_hpc.tracking import Tracker, read_offline_run

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    rd = tmp_path / "run"
    rows = _rows(3)
    first = Tracker.start(_cfg(), rd, rank=0)
    for r in rows[:2]:
        first.log_epoch(r)
    first.finish()  # (a pre-empted job)
    second = Tracker.start(_cfg(), rd, rank=0)  # the requeued job, same run directory
    assert second.id == first.id and second.record["resumed"]
    second.log_epoch(rows[2])
    second.finish()
    rec = json.loads((rd / "wandb_run.json").read_text())
    assert rec["id"] == first.id and len(rec["directories"]) == 2 and rec["last_step"] == 3
    back = read_offline_run(rd)
    assert back["id"] == first.id and len(back["directories"]) == 2
    assert [r["epoch"] for r in back["history"]] == [1, 2, 3]
    out = capfd.readouterr()
    assert out.err.count(f"W&B offline run {first.id}") == 2 and "wandb sync " in out.err
    assert FAKE_KEY[6:] not in out.out + out.err
    assert not [p for p in rd.rglob("*") if p.is_file() and FAKE_KEY[6:].encode() in p.read_bytes()]


# ---------------------------------------------------------------------------- compare
def _offline_dir(run_dir: Path, run_id: str) -> Path:
    """What `wandb sync` is given: an offline-run-* folder holding a .wandb log."""
    d = run_dir / "wandb" / f"offline-run-20260101_000000-{run_id}"
    d.mkdir(parents=True)
    (d / f"run-{run_id}.wandb").write_bytes(b"")
    return d


def _fake_run(
    root: Path, name: str, overrides: list[str], test_auc: float, offline: bool = False, best_epoch: int = 3
) -> Path:
    rd = root / name
    rd.mkdir(parents=True)
    cfg = _cfg(*overrides)
    (rd / "config.yaml").write_text(to_yaml(cfg))
    rows = _rows(3)
    for r in rows:
        r["val.auc"] = test_auc - 0.1 / r["epoch"]
    _write_jsonl(rd, rows)
    (rd / "metrics.json").write_text(
        json.dumps(
            {
                "test.auc": test_auc,
                "test.ap": test_auc - 0.05,
                "test.accuracy": 0.5,
                "test.confusion": [[1, 2], [3, 4]],
                "val.auc": 0.9,
                "best_epoch": best_epoch,
                "epochs_run": 3,
                "calibrated.platt.accuracy": 0.61,
            }
        )
    )
    (rd / "baselines" / "random_forest").mkdir(parents=True)  # a nested run: not a run of its own here
    (rd / "baselines" / "random_forest" / "config.yaml").write_text(to_yaml(cfg))
    if offline:
        _offline_dir(rd, "abcd1234")
    return rd


def _compare_args(*argv: str) -> argparse.Namespace:
    from trd_hpc.cli import build_parser

    return build_parser().parse_args(["compare", *argv])


def test_compare_tables_curves_and_group(tmp_path, capsys):
    from trd_hpc.compare import compare

    root = tmp_path / "runs"
    a = _fake_run(root, "lr-small", ["tracking.group=g1"], 0.8125, offline=True)
    b = _fake_run(root, "lr-big", ["tracking.group=g1", "train.lr=0.002", "model.dropout=0.3"], 0.6875)
    _fake_run(root, "other", ["tracking.group=g2", "train.lr=0.01"], 0.5)
    # the baselines' own offline runs are synced too, also for a run without one of its own
    a_rf = _offline_dir(a / "baselines" / "random_forest", "rfa00001")
    b_rf = _offline_dir(b / "baselines" / "random_forest", "rfb00001")

    png = tmp_path / "out" / "cmp.png"
    args = _compare_args(str(a), str(b), "--out", str(png))
    assert args.func.__module__ == "trd_hpc.cli.compare"
    assert args.func(args) == 0
    out = capsys.readouterr().out
    metrics_part, config_part = out.split("config keys that differ")
    for v in (
        "lr-small",
        "lr-big",
        "test.auc",
        "0.8125",
        "0.6875",
        "test.ap",
        "0.7625",
        "0.6375",
        "best_epoch",
        "epochs_run",
    ):
        assert v in metrics_part, v
    assert "calibrated.platt" not in metrics_part and "val.auc" not in metrics_part
    assert "test.confusion" not in metrics_part  # not a scalar
    table = [l for l in config_part.split("learning curves")[0].splitlines() if l.strip()]
    assert table[0].split() == ["key", "lr-small", "lr-big"] and set(table[1]) <= {"-", " "}
    config_lines = [l.split()[0] for l in table[2:]]
    assert sorted(config_lines) == ["model.dropout", "train.lr"]
    assert "0.002" in config_part and "0.3" in config_part
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"learning curves: {png}" in out
    assert f"wandb sync {a / 'wandb' / 'offline-run-20260101_000000-abcd1234'}" in out
    assert f"wandb sync {a_rf}" in out and f"wandb sync {b_rf}" in out
    assert out.count("wandb sync ") == 3

    # the same through the function: exactly the differing keys
    res = compare([a, b], out=tmp_path / "c2.png", file=io.StringIO())
    assert set(res["config_diff"]) == {"train.lr", "model.dropout"}
    assert res["config_diff"]["train.lr"] == [0.001, 0.002]

    # --group among the run dirs found under a parent (baselines/ not counted as runs)
    res = compare([root], group="g1", out=tmp_path / "g.png", file=io.StringIO())
    assert sorted(r.label for r in res["runs"]) == ["lr-big", "lr-small"]
    res = compare([root], out=tmp_path / "all.png", file=io.StringIO())
    assert sorted(r.label for r in res["runs"]) == ["lr-big", "lr-small", "other"]
    assert set(res["config_diff"]) == {"train.lr", "model.dropout", "tracking.group"}
    with pytest.raises(ValueError, match="tracking.group == 'nope'"):
        compare([root], group="nope", out=tmp_path / "n.png", file=io.StringIO())

    # --metrics with a glob; the rich table renders the same values
    buf = io.StringIO()
    res = compare([a, b], metrics=["calibrated.*", "test.auc"], out=tmp_path / "m.png", file=buf, use_rich=True)
    assert res["metric_keys"] == ["calibrated.platt.accuracy", "test.auc"]
    assert "0.61" in buf.getvalue() and "0.8125" in buf.getvalue()


def _lines(panel: dict, run: str, kind: str) -> list[dict]:
    return [d for d in panel["lines"] if d["run"] == run and d["kind"] == kind]


def test_compare_curves_show_train_and_best_epoch(tmp_path):
    from trd_hpc.compare import compare, load_run

    a = _fake_run(tmp_path, "lr-small", [], 0.8125, best_epoch=2)
    b = _fake_run(tmp_path, "lr-big", ["train.lr=0.002"], 0.6875, best_epoch=3)
    rows = {a.name: _rows(3), b.name: _rows(3)}
    png = tmp_path / "cmp.png"
    res = compare([a, b], out=png, file=io.StringIO())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(res["curves"]) == ["val.loss", "val.auc"]  # the EMT task's curves
    assert res["best_epochs"] == {"lr-small": 2, "lr-big": 3}
    for key, panel in res["curves"].items():
        twin = "train." + key.split(".", 1)[1]
        assert panel["title"] == f"{key} (and {twin})"
        assert panel["legend"] == ["lr-small", "lr-big", "train", "best epoch"]
        for run in (a.name, b.name):
            (val,) = _lines(panel, run, "val")
            (train,) = _lines(panel, run, "train")
            (best,) = _lines(panel, run, "best epoch")
            assert (val["key"], train["key"]) == (key, twin)
            assert val["linestyle"] == "-" and train["linestyle"] == "--" and best["linestyle"] == ":"
            assert val["color"] == train["color"] == best["color"]  # one colour per run
            assert train["x"] == [1.0, 2.0, 3.0]
            assert train["y"] == pytest.approx([r[twin] for r in rows[run]])
            assert set(best["x"]) == {float(res["best_epochs"][run])}
            (ring,) = _lines(panel, run, "best point")  # the best epoch's point ringed on the val curve
            assert ring["x"] == best["x"][:1] and ring["y"] == [val["y"][val["x"].index(best["x"][0])]]
            assert ring["color"] == val["color"]
        assert _lines(panel, a.name, "val")[0]["color"] != _lines(panel, b.name, "val")[0]["color"]

    # a run still training (no metrics.json yet): its last epoch row's best_epoch
    (a / "metrics.json").unlink()
    assert load_run(a).best_epoch == _rows(3)[-1]["best_epoch"] == 3


def _numbers(cell: str):
    return json.loads(cell) if cell.startswith("[") else float(cell)


def test_compare_exports_csv_and_markdown(tmp_path, capsys):
    import csv

    a = _fake_run(tmp_path, "lr-small", [], 2 / 3)
    b = _fake_run(tmp_path, "lr-big", ["train.lr=0.002", "model.dropout=0.3"], 0.6875)
    csv_path, md_path = tmp_path / "out" / "runs.csv", tmp_path / "out" / "runs.md"
    metrics = "test.*,best_epoch"
    args = _compare_args(str(a), str(b), "--out", str(tmp_path / "c.png"), "--metrics", metrics)
    args.csv, args.markdown = str(csv_path), str(md_path)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"csv: {csv_path}" in out and f"markdown: {md_path}" in out

    # CSV: one row per run, the very numbers of metrics.json, then the differing config keys
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["run"] for r in rows] == ["lr-small", "lr-big"]
    header = list(rows[0])
    assert header == ["run", "test.auc", "test.ap", "test.accuracy", "test.confusion", "best_epoch"] + [
        "config.model.dropout",
        "config.train.lr",
    ]
    for row, rd in zip(rows, (a, b)):
        final = json.loads((rd / "metrics.json").read_text())
        for k in header[1:6]:
            assert _numbers(row[k]) == final[k], k  # exact: full precision
    assert rows[0]["test.auc"] == repr(2 / 3) and "0.6667" not in csv_path.read_text()
    assert [float(r["config.train.lr"]) for r in rows] == [0.001, 0.002]

    # Markdown: a header row, its rule, one row per run, numbers as on screen
    md = md_path.read_text().splitlines()
    assert len(md) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in md[:1] + md[2:])
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in md]
    assert cells[0] == header
    assert set(md[1]) <= {"|", "-", ":"} and md[1].count("|") == len(header) + 1
    assert [c[0] for c in cells[2:]] == ["lr-small", "lr-big"]
    assert cells[2][header.index("test.auc")] == "0.6667" and "0.6667" in out

    # "-": the table alone on stdout (a pipe into a file), the report on stderr
    from trd_hpc.compare import compare

    res = compare([a, b], out=tmp_path / "d.png", metrics=["test.auc"], csv_file="-")
    cap = capsys.readouterr()
    assert cap.out == res["csv"]
    assert list(csv.reader(io.StringIO(cap.out)))[1] == ["lr-small", repr(2 / 3), "0.2", "0.001"]
    assert "final metrics" in cap.err and "final metrics" not in cap.out


def test_compare_bad_export_path_is_one_line_error(tmp_path):
    from trd_hpc.compare import compare
    from trd_hpc.errors import WriteError

    a = _fake_run(tmp_path, "run", [], 0.8)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    png = tmp_path / "c.png"
    r = cli("compare", str(a), "--out", str(png), "--csv", str(blocker / "runs.csv"), check=False)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --csv ") and "not a directory" in err[0], r.stderr
    assert not png.exists() and r.stdout == ""  # refused before any work

    with pytest.raises(WriteError, match="--markdown .*is a directory"):
        compare([a], out=png, markdown_file=tmp_path, file=io.StringIO())


# ---------------------------------------------------------------------------- metrics.csv
def test_csv_history_beside_wandb(tmp_path, capfd):
    import csv

    from trd_hpc.tracking import Tracker

    cfg = _cfg("tracking.wandb=false", "tracking.csv=true")  # a site where nothing may leave
    rd = tmp_path / "run"
    rows = _rows(3)
    rows[2]["val.extra"] = 0.25  # a key that appears late gets its column then
    t = Tracker.start(cfg, rd, rank=0)
    assert not t.enabled
    for r in rows[:2]:
        t.log_epoch(r)
    _write_jsonl(rd, rows[:2])
    t.finish()  # (pre-empted)

    t = Tracker.start(cfg, rd, rank=0)  # resumed: the earlier epochs come from metrics.jsonl
    t.log_epoch(rows[2])
    t.finish()
    back = list(csv.DictReader(io.StringIO((rd / "metrics.csv").read_text())))
    assert list(back[0]) == list(rows[0]) + ["val.extra"]
    assert [b["val.extra"] for b in back] == ["", "", "0.25"]
    for got, want in zip(back, rows):
        assert all(_same(float(got[k]), float(want[k])) for k in want), (got, want)

    # other ranks and the default config write no metrics.csv
    Tracker.start(cfg, tmp_path / "rank1", rank=1).log_epoch(rows[0])
    Tracker.start(_cfg("tracking.wandb=false"), tmp_path / "off", rank=0).log_epoch(rows[0])
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "off").exists()

    # a metrics.csv that cannot be written: said once, training goes on
    bad = tmp_path / "bad"
    (bad / "metrics.csv").mkdir(parents=True)
    t = Tracker.start(cfg, bad, rank=0)
    t.log_epoch(rows[0])
    t.log_epoch(rows[1])
    assert t.csv is None and capfd.readouterr().err.count("CSV metrics: stopped") == 1


def test_compare_says_when_runs_rest_on_different_cohorts(tmp_path):
    """Two runs, one on a synthetic and one on an ingested cohort: the table is printed, and a
    note says they are not comparable subject for subject, naming each run's cohort."""
    from trd_hpc.compare import compare

    root = tmp_path / "runs"
    a = _fake_run(root, "synthetic", [], 0.9)
    b = _fake_run(root, "real", [], 0.7)
    c = _fake_run(root, "synthetic-again", [], 0.8)
    syn = {"origin": "synthetic", "generator": "paper 000", "seed": 7, "manifest_sha256": "a" * 64}
    real = {"origin": "ingested", "spec_folder": "/data/study", "table_sha256": "b" * 64, "manifest_sha256": "c" * 64}
    for rd, ident in ((a, syn), (b, real), (c, syn)):
        m = json.loads((rd / "metrics.json").read_text())
        (rd / "metrics.json").write_text(json.dumps({**m, "cohort": ident}))
    buf = io.StringIO()
    res = compare([a, b], out=tmp_path / "x.png", file=buf)
    note = res["cohort_note"]
    assert note and "2 different cohorts (synthetic and ingested side by side)" in note and note in buf.getvalue()
    assert (
        "synthetic: synthetic cohort (paper 000 generator, seed 7)" in note
        and "real: ingested from /data/study" in note
    )
    assert compare([a, c], out=tmp_path / "y.png", file=io.StringIO())["cohort_note"] is None  # one cohort: no note


# ---------------------------------------------------------------------------- MLflow
def test_mlflow_records_a_training_run_offline_in_its_run_directory(tmp_path, emt_cohort_dir):
    """tracking.mlflow=true: the same epoch rows, final metrics and figures as W&B gets, in
    MLflow's SQLite store inside the run directory; a second process continues the same run;
    nothing lands in the working directory."""
    from mlflow.tracking import MlflowClient

    from trd_hpc.tracking import Tracker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = tmp_path / "run"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(run),
        "--quiet",
        "train.max_epochs=2",
        "eval.baselines=[]",
        "tracking.wandb=false",
        "tracking.mlflow=true",
        "tracking.csv=true",
        f"data.cohort={emt_cohort_dir}",
        cwd=cwd,
    )
    rec = json.loads((run / "mlflow_run.json").read_text())
    assert rec["tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    client = MlflowClient(rec["tracking_uri"])
    got = client.get_run(rec["run_id"])
    assert got.info.status == "FINISHED"
    assert got.data.params["train.max_epochs"] == "2" and got.data.params["task"] == "emt"
    assert got.data.tags["trd_hpc.task"] == "emt" and len(got.data.tags["cohort.manifest_sha256"]) == 64
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_loss = client.get_metric_history(rec["run_id"], "val.loss")
    assert [m.step for m in val_loss] == [1, 2]
    assert [m.value for m in val_loss] == pytest.approx([h["val.loss"] for h in history])
    final = json.loads((run / "metrics.json").read_text())
    assert got.data.metrics["test.auc"] == pytest.approx(final["test.auc"])
    artifacts = {a.path for a in client.list_artifacts(rec["run_id"], "figures")}
    assert artifacts and all(a.endswith(".png") for a in artifacts)
    assert list(cwd.iterdir()) == []  # no mlruns/ or mlflow.db where the command ran
    assert (run / "metrics.csv").is_file()

    # a later process on the same run directory (resume, `trd-hpc evaluate`) continues that run
    cfg = _cfg("tracking.wandb=false", "tracking.mlflow=true")
    t = Tracker.start(cfg, run, rank=0)
    t.log_epoch({"epoch": 3, "val.loss": 0.125})
    t.finish()
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == rec["run_id"]
    assert [m.step for m in client.get_metric_history(rec["run_id"], "val.loss")] == [1, 2, 3]
    assert len(client.search_runs([got.info.experiment_id])) == 1
    # other ranks log nothing
    assert Tracker.start(cfg, tmp_path / "rank1", rank=1).logger("mlflow") is None

    # compare reads a run back through the same protocol when only a tracker's log came along:
    # MLflow's store first, then metrics.csv (each Logger's read_back)
    from trd_hpc.compare import load_run

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "metrics.jsonl").unlink()
    (copy / "metrics.json").unlink()
    back = load_run(copy)
    assert [r["epoch"] for r in back.history] == [1, 2, 3]
    assert [r["val.loss"] for r in back.history[:2]] == pytest.approx([h["val.loss"] for h in history])
    assert back.metrics["test.auc"] == pytest.approx(final["test.auc"])
    assert "test.auc" not in back.history[-1]  # a final metric is the summary, not an epoch's value
    (copy / "mlflow_run.json").unlink()
    assert (copy / "metrics.csv").is_file()
    back = load_run(copy)
    assert [r["epoch"] for r in back.history] == [1, 2]  # the CSV holds what training logged
    assert [r["val.loss"] for r in back.history] == pytest.approx([h["val.loss"] for h in history])
    r = cli("compare", str(copy), "--out", str(tmp_path / "cmp.png"))
    assert "its epochs read back from its csv log" in r.stderr, r.stderr


def test_compare_writes_nothing_into_the_working_directory_unless_asked(tmp_path):
    a = _fake_run(tmp_path / "runs", "a", [], 0.8)
    b = _fake_run(tmp_path / "runs", "b", ["train.lr=0.002"], 0.7)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = cli("compare", str(a), str(b), cwd=cwd)
    assert "learning curves: not drawn (--out FILE.png draws them)" in r.stdout, r.stdout
    assert list(cwd.iterdir()) == []
    r = cli("compare", str(a), str(b), "--out", "curves.png", cwd=cwd)
    assert [p.name for p in cwd.iterdir()] == ["curves.png"]
