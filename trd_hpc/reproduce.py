"""``trd-hpc reproduce paper000|paper001``: a paper's whole pipeline into one directory, then
``reproduction.md``, the paper's headline table beside ours.

Each stage is a ``trd-hpc`` command run as its own process, exactly as a user would type it
(the Markdown lists them with their wall times), so the reproduction is the README's commands
and nothing else.  ``reproduce.json`` records every finished stage; a rerun skips a stage whose
record and outputs are both there and runs the rest (a killed ``train`` resumes from its last
checkpoint, since every training stage passes ``--resume auto``).

Every figure in the ``trd-hpc`` column is read from the run's own files through ``Sources``,
which keeps, per table row, the file, key and value behind each number
(``reproduction.json``), so a test can check each number against the files.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trd_hpc import resources
from trd_hpc.errors import TrdError
from trd_hpc.fsio import atomic_write_json, atomic_write_text
from trd_hpc.launch.plan import available_cpus
from trd_hpc.rundir import read_json

STATE = "reproduce.json"
SCALES = ("tiny", "paper")


class ReproduceError(TrdError):
    """A stage failed, or DIR holds another paper's or scale's reproduction."""


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]  # after `trd-hpc`
    outputs: tuple[str, ...]  # files (relative to DIR) a finished stage has written

    def done(self, out: Path) -> bool:
        return all((out / p).exists() for p in self.outputs)

    def command(self) -> str:
        return shlex.join(("trd-hpc", *self.args))


class Sources:
    """Values read from the run's JSON files, each remembered with where it came from."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._files: dict[str, dict] = {}
        self.used: list[dict] = []

    def has(self, file: str, key: str) -> bool:
        return key in self._load(file)

    def keys(self, file: str, prefix: str) -> list[str]:
        return [k for k in self._load(file) if k.startswith(prefix)]

    def get(self, file: str, key: str, *index: int):
        data = self._load(file)
        if key not in data:
            raise ReproduceError(f"{self.out / file}: no key '{key}' (was the stage that writes it finished?)")
        v = data[key]
        for i in index:
            v = v[i]
        self.used.append({"file": file, "key": key, "index": list(index), "value": v})
        return v

    def _load(self, file: str) -> dict:
        if file not in self._files:
            self._files[file] = read_json(self.out / file, "metrics file")
        return self._files[file]


@dataclass(frozen=True)
class Row:
    label: str
    paper: str
    ours: Callable[[Sources], str]


@dataclass(frozen=True)
class Recipe:
    paper: str
    title: str
    stages: tuple[Stage, ...]
    header: Callable[[Sources], str]  # first column's heading, e.g. "test set (225 volumes)"
    rows: tuple[Row, ...]
    reductions: tuple[str, ...] = field(default=())


# ------------------------------------------------------------------------------------ helpers
def _f(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{digits}f}"


def _epochs(src: Sources, file: str) -> str:
    run, best = src.get(file, "epochs_run"), src.get(file, "best_epoch")
    if src.get(file, "stopped_early"):
        return f"early stop at epoch {run}, best epoch {best}"
    return f"{run} epochs (the limit), best epoch {best}"


def _cv(src: Sources, key: str, digits: int) -> str:
    f = "cv/cv_summary.json"
    mean, sd = src.get(f, f"mean.{key}"), src.get(f, f"sd.{key}")
    lo, hi = src.get(f, f"min.{key}"), src.get(f, f"max.{key}")
    return f"{_f(mean, digits)} +- {_f(sd, digits)} ({_f(lo, digits)}..{_f(hi, digits)})"


def _cfg(paper: str, scale: str) -> str:
    """The paper's packaged config: ``configs/NAME.yaml`` when the working directory is a checkout
    showing that very file (the commands in reproduction.md then read as the README's), else
    its packaged name, which every command takes."""
    name = {"paper000": "emt", "paper001": "cnn3d"}[paper] + ("_tiny" if scale == "tiny" else "")
    local = Path("configs") / f"{name}.yaml"
    if local.is_file() and local.resolve() == resources.config_path(name).resolve():
        return str(local)
    return name


def _generate_and_train(cfg: str, data: str, main: str, overrides: list[str]) -> tuple[Stage, Stage]:
    """The first two stages of both papers: the cohort, then the main model (evaluated later,
    with its baselines, by the evaluate stage)."""
    return (
        Stage("generate", ("generate", cfg, "--out", data, "--workers", "2"), ("data/manifest.json",)),
        Stage(
            "train",
            ("train", cfg, "--out", main, "--resume", "auto", "--no-eval", f"data.cohort={data}", *overrides),
            ("main/metrics.json", "main/model.pt"),
        ),
    )


# ------------------------------------------------------------------------------ paper 000 (EMT)
def _paper000(out: Path, scale: str) -> Recipe:
    cfg, data, main = _cfg("paper000", scale), str(out / "data"), str(out / "main")
    tiny = ["train.max_epochs=4"] if scale == "tiny" else []
    stages = (
        *_generate_and_train(cfg, data, main, tiny),
        # the baselines (late-fusion MLP, random forest) are trained here, then everything is evaluated
        Stage("evaluate", ("evaluate", main), ("main/report.html", "main/bundle")),
    )

    def acc(src: Sources) -> str:
        m = "main/metrics.json"
        return (
            f"{_f(src.get(m, 'test.accuracy'))} (mean P = {_f(src.get(m, 'test.mean_prob_neg'))} / "
            f"{_f(src.get(m, 'test.mean_prob_pos'))})"
        )

    def calibrated(key: str, with_auc: bool) -> Callable[[Sources], str]:
        def cell(src: Sources) -> str:
            m, methods = "main/metrics.json", ("platt", "isotonic", "temperature")
            have = [x for x in methods if src.has(m, f"calibrated.{x}.{key}")]
            vals = " / ".join(_f(src.get(m, f"calibrated.{x}.{key}"), 3 if key != "ece" else 4) for x in have)
            aucs = ", AUC " + " / ".join(_f(src.get(m, f"calibrated.{x}.auc")) for x in have) if with_auc else ""
            return f"{' / '.join(have)}: {vals}{aucs}"

        return cell

    def baseline(name: str) -> Callable[[Sources], str]:
        return lambda src: _f(src.get("main/metrics.json", f"baselines.{name}.auc"))

    m = "main/metrics.json"
    rows = (
        Row("ROC AUC", "1.00", lambda s: _f(s.get(m, "test.auc"))),
        Row("average precision", "1.00", lambda s: _f(s.get(m, "test.ap"))),
        Row("accuracy at 0.5, uncalibrated", "0.50 (probabilities compressed to ~0.32 / ~0.41)", acc),
        Row(
            "ECE / Brier, uncalibrated",
            "-",
            lambda s: f"{_f(s.get(m, 'test.ece'), 4)} / {_f(s.get(m, 'test.brier'), 4)}",
        ),
        Row("accuracy after calibration", "improved, AUC kept at 1.00", calibrated("accuracy", True)),
        Row("ECE after calibration", "-", calibrated("ece", False)),
        Row("convergence", "early stop at epoch 8", lambda s: _epochs(s, m)),
        Row("late-fusion MLP baseline AUC", "> 0.90, below EMT", baseline("late_fusion_mlp")),
        Row("random-forest baseline AUC", "> 0.90, below EMT", baseline("random_forest")),
    )
    return Recipe(
        "paper000",
        "EMT (paper 000)",
        stages,
        lambda s: f"test set ({s.get(m, 'test.n')} subjects)",
        rows,
        reductions=("train.max_epochs=4 (tiny scale)",) if tiny else (),
    )


# ------------------------------------------------------------------- paper 001 (dual-path 3-D CNN)
def _paper001(out: Path, scale: str) -> Recipe:
    cfg, data, main = _cfg("paper001", scale), str(out / "data"), str(out / "main")
    # Reductions that keep a two-core run within about two hours; each is stated in
    # reproduction.md. At the paper's 39 epochs with early stopping a fold takes 12-22 min here,
    # the five of them longer than everything else together; on a cluster `slurm/cv_cnn3d.sh`
    # runs the full folds as an array.
    if scale == "tiny":
        main_epochs, resnet_epochs, cv_epochs = ["train.max_epochs=4"], 1, ["train.max_epochs=2"]
    else:
        main_epochs, resnet_epochs, cv_epochs = [], 3, ["train.max_epochs=10"]
    baselines = "eval.baselines=[single_task_response,single_task_severity,resnet18]"
    stages = (
        *_generate_and_train(cfg, data, main, main_epochs),
        Stage(
            "resnet18",
            (
                "train",
                cfg,
                "--out",
                f"{main}/baselines/resnet18",
                "--resume",
                "auto",
                "--no-eval",
                f"data.cohort={data}",
                "model.name=resnet18",
                f"train.max_epochs={resnet_epochs}",
            ),
            ("main/baselines/resnet18/metrics.json",),
        ),  # fmt: skip
        # trains the two single-task baselines with the main run's settings, then evaluates all
        Stage("evaluate", ("evaluate", main, baselines), ("main/report.html", "main/bundle")),
        Stage(
            "cv",
            (
                "cv",
                cfg,
                "--folds",
                "5",
                "--out",
                str(out / "cv"),
                f"data.cohort={data}",
                *cv_epochs,
            ),
            ("cv/cv_summary.json",),
        ),  # fmt: skip
    )
    m = "main/metrics.json"

    def accuracy(src: Sources) -> str:
        k_range = range(3)  # rows: true class, columns: predicted (metrics.multiclass_metrics)
        correct = [src.get(m, "test.confusion_matrix", k, k) for k in k_range]
        total = [src.get(m, key) for key in src.keys(m, "test.support.")]  # in class order
        return (
            f"{_f(src.get(m, 'test.accuracy'))} ({' / '.join(map(str, correct))} correct of "
            f"{' / '.join(map(str, total))}; macro F1 {_f(src.get(m, 'test.macro_f1'))})"
        )

    def mae(src: Sources) -> str:
        return (
            f"{_f(src.get(m, 'test.severity_mae'), 2)} (RMSE {_f(src.get(m, 'test.severity_rmse'), 2)}, "
            f"Pearson r {_f(src.get(m, 'test.severity_pearson_r'))})"
        )

    def baseline(name: str, acc: bool, sev: bool) -> Callable[[Sources], str]:
        def cell(src: Sources) -> str:
            f = f"main/baselines/{name}/metrics.json"
            parts = ([f"accuracy {_f(src.get(f, 'test.accuracy'))}"] if acc else []) + (
                [f"MAE {_f(src.get(f, 'test.severity_mae'), 2)}"] if sev else []
            )
            return f"{', '.join(parts)} ({_epochs(src, f)})"

        return cell

    rows = (
        Row("response accuracy", "1.000 (58 / 113 / 54 all correct)", accuracy),
        Row("severity MAE (0-100 scale)", "8.03", mae),
        Row("convergence", "~25 of 39 epochs", lambda s: _epochs(s, m)),
        Row("5-fold CV accuracy, mean +- sd (min..max)", "> 0.99", lambda s: _cv(s, "test.accuracy", 3)),
        Row("5-fold CV severity MAE", "7.9 - 8.4", lambda s: _cv(s, "test.severity_mae", 2)),
        Row("single-task CNN, response only", "-", baseline("single_task_response", True, False)),
        Row("single-task CNN, severity only", "-", baseline("single_task_severity", False, True)),
        Row("3-D ResNet-18 (MONAI), two heads", "-", baseline("resnet18", True, True)),
    )
    reductions = [f"ResNet-18 baseline: train.max_epochs={resnet_epochs}"]
    if scale == "tiny":
        reductions[:0] = ["main run and single-task baselines: train.max_epochs=4"]
    reductions.append(f"CV folds: {cv_epochs[0]}")
    return Recipe(
        "paper001",
        "dual-path 3-D CNN (paper 001)",
        stages,
        lambda s: f"test set ({s.get(m, 'test.n')} volumes)",
        rows,
        reductions=tuple(reductions),
    )


RECIPES: dict[str, Callable[[Path, str], Recipe]] = {"paper000": _paper000, "paper001": _paper001}


# ---------------------------------------------------------------------------------- the runner
def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def _check_state(state: dict, paper: str, scale: str, path: Path) -> None:
    have = (state.get("paper"), state.get("scale"))
    if have != (paper, scale):
        raise ReproduceError(
            f"{path}: this directory holds the {have[0]} reproduction at --scale {have[1]}; "
            f"use another --out for {paper} at --scale {scale}"
        )


def reproduce(paper: str, out: str | Path, scale: str = "tiny", progress: bool = True) -> Path:
    """Run (or continue) ``paper``'s stages into ``out`` and write ``out/reproduction.md``."""
    if paper not in RECIPES:
        raise ReproduceError(f"unknown paper {paper!r}; one of: {', '.join(RECIPES)}")
    if scale not in SCALES:
        raise ReproduceError(f"unknown --scale {scale!r}; one of: {', '.join(SCALES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[paper](out, scale)
    state_path = out / STATE
    state = read_json(state_path, "reproduction state") if state_path.exists() else {"paper": paper, "scale": scale}
    _check_state(state, paper, scale, state_path)
    state.setdefault("stages", {})
    for i, stage in enumerate(recipe.stages, 1):
        rec = state["stages"].get(stage.name)
        where = f"stage {i}/{len(recipe.stages)} {stage.name}"
        if rec and rec.get("finished") and rec.get("command") == stage.command() and stage.done(out):
            _say(f"{where}: finished before ({rec['seconds']:.0f} s), skipped")
            continue
        _say(f"{where}: {stage.command()}")
        # Marked as running before it starts: a stage found still "running" on the next call
        # was killed without saving its time, and the table says so instead of under-counting.
        interrupted = (rec or {}).get("interrupted", 0) + int(bool(rec and rec.get("running")))
        entry = {"command": stage.command(), "finished": False, "interrupted": interrupted}
        prior = (rec or {}).get("seconds_before", 0.0)
        state["stages"][stage.name] = {**entry, "running": True, "seconds_before": prior}
        atomic_write_json(state_path, state)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "trd_hpc.cli", *stage.args]
        log = out / "logs" / f"{stage.name}.log"
        if progress:
            rc = subprocess.run(cmd).returncode
        else:  # --quiet: each stage's output goes to DIR/logs/STAGE.log
            log.parent.mkdir(exist_ok=True)
            with open(log, "ab") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - t0 + prior
        if rc != 0 or not stage.done(out):
            # failed, or pre-empted (SIGUSR2/SIGTERM saved a checkpoint and exited 0): its time is
            # known and counted when a later call finishes the stage
            state["stages"][stage.name] = {**entry, "seconds_before": seconds}
            atomic_write_json(state_path, state)
        if rc != 0:
            if not progress:
                sys.stderr.write(_tail(log))
            raise ReproduceError(
                f"{where} failed (exit {rc}): {stage.command()}"
                + ("" if progress else f" (its output: {log})")
                + "; fix the cause and rerun the same `trd-hpc reproduce` to continue from this stage"
            )
        if not stage.done(out):
            raise ReproduceError(
                f"{where} stopped before writing {', '.join(stage.outputs)}; rerun the same `trd-hpc reproduce` to continue"
            )
        state["stages"][stage.name] = {**entry, "finished": True, "seconds": seconds}
        atomic_write_json(state_path, state)
        _say(f"{where}: done in {seconds:.0f} s")
    md = write_reproduction(recipe, out, scale, state)
    _say(f"table: {md}")
    return md


def table(recipe: Recipe, out: Path) -> tuple[list[dict], str]:
    """The rows (label, paper, ours, the sources behind ours) and their Markdown."""
    rows = []
    src = Sources(out)
    header = recipe.header(src)
    src.used.clear()
    for r in recipe.rows:
        src.used = []
        cell = r.ours(src)
        rows.append({"label": r.label, "paper": r.paper, "ours": cell, "sources": src.used})
    lines = [f"| {header} | {recipe.paper.replace('paper', 'paper ')} | trd-hpc |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['paper']} | {r['ours']} |" for r in rows]
    return rows, "\n".join(lines)


def write_reproduction(recipe: Recipe, out: Path, scale: str, state: dict) -> Path:
    rows, md_table = table(recipe, out)
    stages = state["stages"]
    total = sum(stages[s.name]["seconds"] for s in recipe.stages)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"# Reproduction of the {recipe.title}, --scale {scale}",
        "",
        f"`trd-hpc reproduce {recipe.paper} --out {out} --scale {scale}` on {platform.node()} "
        f"({platform.machine()}, {available_cpus()} CPUs), {when}. Every figure in the trd-hpc column is read "
        f"from this directory's `metrics.json` and `cv_summary.json` files; `reproduction.json` "
        "names the file and key behind each.",
        "",
        md_table,
        "",
    ]
    if recipe.reductions:
        lines += ["Reductions from the paper's settings: " + "; ".join(recipe.reductions) + ".", ""]
    lines += ["| stage | command | wall |", "|---|---|---|"]
    lines += [f"| {s.name} | `{s.command()}` | {_wall(stages[s.name])} |" for s in recipe.stages]
    lost = any(stages[s.name].get("interrupted") for s in recipe.stages)
    lines += [f"| total | | {total:.0f} s ({total / 60:.1f} min){' + uncounted' if lost else ''} |", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "reproduction.md", text)
    atomic_write_json(
        out / "reproduction.json",
        {"paper": recipe.paper, "scale": scale, "rows": rows, "stages": stages, "total_seconds": total},
    )
    return out / "reproduction.md"


def _wall(rec: dict) -> str:
    """A stage's wall time; attempts killed outright saved no time, so they are named rather
    than silently left out."""
    cell = f"{rec['seconds']:.0f} s"
    n = rec.get("interrupted", 0)
    if n:
        cell += f" + {n} killed attempt{'s' if n > 1 else ''} not counted"
    return cell


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    return "".join(f"  {ln}\n" for ln in text)
