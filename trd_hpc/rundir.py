"""A run directory: what training writes and everything after it reads.

  config.yaml        the resolved experiment config
  metrics.jsonl      one row per epoch (written whole after each epoch)
  metrics.json       final metrics, flat dotted keys (test.*, val.*, calibrated.*, baselines.*)
  model.pt           the best weights (a state_dict; loads with weights_only=True)
  checkpoints/       resumable training state
  predictions/       val.npz, test.npz: per-subject outputs
  baselines/NAME/    each baseline's own run directory (or metrics + predictions)
  figures/, report.html

Every file here is written through ``fsio`` (temp + fsync + rename), so a reader sees the
old file or the new one, never half of one; every reader names the file it could not read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trd_hpc.errors import RunDirError
from trd_hpc.fsio import atomic_write_json, atomic_write_text, atomic_write_with

CONFIG, METRICS, HISTORY, MODEL = "config.yaml", "metrics.json", "metrics.jsonl", "model.pt"
PREEMPTED = "PREEMPTED"


def json_safe(d: dict) -> dict:
    """NaN -> None at the top level (JSON has no NaN; a metric that could not be computed)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: unreadable {what} ({type(e).__name__}); the file is truncated or damaged") from None


def read_json_lines(path: Path, skip_bad: bool = False) -> list[dict]:
    """One JSON object per line; a line that is not JSON is an error naming it, or skipped
    (``skip_bad``: readers that show what they can, e.g. a file copied from a killed run)."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                if skip_bad:
                    continue
                raise RunDirError(f"{path}: line {i} is not JSON; the file is truncated or damaged") from None
    return rows


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY

    @property
    def model_file(self) -> Path:
        return self.path / MODEL

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    def predictions_file(self, split: str) -> Path:
        return self.path / "predictions" / f"{split}.npz"

    def baseline(self, name: str) -> "RunDir":
        return RunDir(self.path / "baselines" / name)

    # ------------------------------------------------------------------ state
    def is_run(self) -> bool:
        return self.config_file.is_file()

    def has_metrics(self) -> bool:
        return self.metrics_file.is_file()

    def finished_training(self) -> bool:
        """metrics.json and the test predictions exist (what a baseline is reused from)."""
        return self.has_metrics() and self.predictions_file("test").is_file()

    # ------------------------------------------------------------------ readers
    def config(self):
        """The validated config.yaml; RunDirError naming the file when it is missing,
        truncated or not a config."""
        import yaml

        from trd_hpc.config import validate_experiment

        path = self.config_file
        if not path.is_file():
            raise RunDirError(f"{self.path}: no config.yaml (is this a run directory?)")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RunDirError(
                f"{path}: unreadable ({type(e).__name__}); the file is truncated or damaged. "
                f"Restore it, or start a new run with another --out"
            ) from None
        if not isinstance(data, dict):
            raise RunDirError(f"{path}: not a config (a mapping of keys); the file is truncated or damaged")
        return validate_experiment(data, str(path))

    def metrics(self, required: bool = False) -> dict:
        if not self.metrics_file.is_file():
            if required:
                raise RunDirError(f"{self.metrics_file} is missing: the run has not finished training")
            return {}
        return read_json(self.metrics_file, "metrics")

    def history(self, skip_bad: bool = False) -> list[dict]:
        return read_json_lines(self.history_file, skip_bad) if self.history_file.is_file() else []

    def predictions(self, split: str) -> dict[str, np.ndarray]:
        p = self.predictions_file(split)
        if not p.exists():
            raise RunDirError(f"{p} is missing: the run has not finished training (resume it with --resume auto)")
        try:
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError: truncated or not an npz
            raise RunDirError(
                f"{p}: unreadable predictions ({type(e).__name__}); the file is truncated or damaged. "
                f"Remove it and model.pt, then `trd-hpc train ... --resume auto` writes them again"
            ) from None

    def load_weights(self, model):
        """``model`` with model.pt loaded (weights_only), in eval mode."""
        import torch

        path = self.model_file
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise RunDirError(
                f"{path} is missing: the run has not finished training (resume it with --resume auto)"
            ) from None
        except Exception as e:  # truncated zip, garbage, pickle of non-tensors
            raise RunDirError(
                f"{path}: unreadable weights ({type(e).__name__}); the file is truncated or damaged"
            ) from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise RunDirError(
                f"{path}: weights do not fit the model of {self.config_file}: {str(e).splitlines()[0]}"
            ) from None
        return model.eval()

    # ------------------------------------------------------------------ writers (atomic)
    def write_config(self, cfg) -> None:
        from trd_hpc.config import to_yaml

        atomic_write_text(self.config_file, to_yaml(cfg))

    def write_metrics(self, metrics: dict) -> dict:
        safe = json_safe(metrics)
        atomic_write_json(self.metrics_file, safe, fault="metrics")
        return safe

    def write_history(self, rows: list[dict]) -> None:
        atomic_write_text(self.history_file, "".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, name: str, obj: Any, indent: int | None = 1) -> Path:
        path = self.path / name
        atomic_write_json(path, obj, indent=indent)
        return path

    def write_predictions(self, split: str, rec: dict[str, np.ndarray]) -> None:
        # np.savez adds ".npz" to a name without it: write through an open file instead.
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **rec)

        atomic_write_with(self.predictions_file(split), write)
