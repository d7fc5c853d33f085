"""`trd-hpc reproduce paper000`: the EMT paper's stages and its headline table beside ours."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from trd_hpc.recipe import Recipe, Row, Sources, Stage, config_ref, epochs_cell, fmt, generate_and_train


def recipe(out: Path, scale: str) -> Recipe:
    cfg, data, main = config_ref("emt", scale), str(out / "data"), str(out / "main")
    tiny = ["train.max_epochs=4"] if scale == "tiny" else []
    stages = (
        *generate_and_train(cfg, data, main, tiny),
        # the baselines (late-fusion MLP, random forest) are trained here, then everything is evaluated
        Stage("evaluate", ("evaluate", main), ("main/report.html", "main/bundle")),
    )

    def acc(src: Sources) -> str:
        m = "main/metrics.json"
        return (
            f"{fmt(src.get(m, 'test.accuracy'))} (mean P = {fmt(src.get(m, 'test.mean_prob_neg'))} / "
            f"{fmt(src.get(m, 'test.mean_prob_pos'))})"
        )

    def calibrated(key: str, with_auc: bool) -> Callable[[Sources], str]:
        def cell(src: Sources) -> str:
            m, methods = "main/metrics.json", ("platt", "isotonic", "temperature")
            have = [x for x in methods if src.has(m, f"calibrated.{x}.{key}")]
            vals = " / ".join(fmt(src.get(m, f"calibrated.{x}.{key}"), 3 if key != "ece" else 4) for x in have)
            aucs = ", AUC " + " / ".join(fmt(src.get(m, f"calibrated.{x}.auc")) for x in have) if with_auc else ""
            return f"{' / '.join(have)}: {vals}{aucs}"

        return cell

    def baseline(name: str) -> Callable[[Sources], str]:
        return lambda src: fmt(src.get("main/metrics.json", f"baselines.{name}.auc"))

    m = "main/metrics.json"
    rows = (
        Row("ROC AUC", "1.00", lambda s: fmt(s.get(m, "test.auc"))),
        Row("average precision", "1.00", lambda s: fmt(s.get(m, "test.ap"))),
        Row("accuracy at 0.5, uncalibrated", "0.50 (probabilities compressed to ~0.32 / ~0.41)", acc),
        Row(
            "ECE / Brier, uncalibrated",
            "-",
            lambda s: f"{fmt(s.get(m, 'test.ece'), 4)} / {fmt(s.get(m, 'test.brier'), 4)}",
        ),
        Row("accuracy after calibration", "improved, AUC kept at 1.00", calibrated("accuracy", True)),
        Row("ECE after calibration", "-", calibrated("ece", False)),
        Row("convergence", "early stop at epoch 8", lambda s: epochs_cell(s, m)),
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
