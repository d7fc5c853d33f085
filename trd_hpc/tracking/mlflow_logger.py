"""MLflow, on this machine by default: ``tracking.mlflow: true`` records a run's parameters,
epoch metrics, final metrics and figures in ``RUN_DIR/mlflow.db`` (MLflow's SQLite store;
no server, no network), or in the store ``tracking.mlflow_uri`` names (``sqlite:///shared.db``
for several runs, or an ``http(s)://`` tracking server).

``RUN_DIR/mlflow_run.json`` keeps the MLflow run id, so a requeued or resumed training and
``trd-hpc evaluate`` continue the same run.  Browse with ``mlflow ui --backend-store-uri
sqlite:///RUN_DIR/mlflow.db``.  Needs ``pip install 'trd-hpc[mlflow]'``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from trd_hpc.tracking.base import finite_metrics, say_once

RUN_RECORD = "mlflow_run.json"
LOCAL_STORE = "mlflow.db"
WHO = "MLflow tracking"


def store_uri(tc, run_dir: Path) -> str:
    return tc.mlflow_uri or f"sqlite:///{(Path(run_dir) / LOCAL_STORE).resolve()}"


class MlflowLogger:
    name = "mlflow"

    def __init__(self, client: Any, run_id: str, run_dir: Path):
        self.client, self.run_id, self.run_dir = client, run_id, Path(run_dir)
        self._failed = False
        self._last_step = 0
        self._epoch_keys: set[str] = set()
        self._summary: dict[str, float] = {}

    @classmethod
    def start(cls, cfg, run_dir: Path, job_type: str | None, group: str | None, name: str | None, cohort: dict | None):
        """The logger of ``run_dir``'s MLflow run (made, or continued from mlflow_run.json); None
        (said once why) when MLflow is not installed or its store cannot be opened."""
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            say_once("off (the mlflow package is not installed: pip install 'trd-hpc[mlflow]')", WHO)
            return None
        from trd_hpc.config import flatten

        for noisy in ("mlflow", "alembic"):  # the store's schema set-up logs at INFO on stderr
            logging.getLogger(noisy).setLevel(logging.WARNING)
        tc, run_dir = cfg.tracking, Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = store_uri(tc, run_dir)
        record_path = run_dir / RUN_RECORD
        try:
            client = MlflowClient(tracking_uri=uri)
            previous = json.loads(record_path.read_text()) if record_path.is_file() else None
            if previous and previous.get("tracking_uri") == uri:
                run_id = previous["run_id"]
                client.update_run(run_id, status="RUNNING")
                verb = "resumed"
            else:
                exp = client.get_experiment_by_name(tc.project)
                if exp is None:
                    # artifacts beside the store, never under the working directory (MLflow's default)
                    where = (run_dir / "mlflow-artifacts").resolve().as_uri() if not tc.mlflow_uri else None
                    exp_id = client.create_experiment(tc.project, artifact_location=where)
                else:
                    exp_id = exp.experiment_id
                tags = {
                    "trd_hpc.task": cfg.task,
                    "trd_hpc.job_type": job_type if job_type is not None else tc.job_type,
                    **({"trd_hpc.group": g} if (g := group if group is not None else tc.group) else {}),
                    **{f"tag.{t}": "1" for t in tc.tags},
                    **{f"cohort.{k}": str(v) for k, v in (cohort or {}).items() if v is not None},
                }
                run = client.create_run(exp_id, run_name=name if name is not None else run_dir.name, tags=tags)
                run_id = run.info.run_id
                params = {
                    k: json.dumps(v) if not isinstance(v, str) else v
                    for k, v in flatten(cfg.model_dump(mode="json")).items()
                }
                from mlflow.entities import Param

                items = [Param(k[:250], v[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                    client.log_batch(run_id, params=items[i : i + 100])
                verb = "started"
            from trd_hpc.fsio import atomic_write_json

            atomic_write_json(record_path, {"run_id": run_id, "tracking_uri": uri, "experiment": tc.project})
        except Exception as e:  # noqa: BLE001  (tracking must never stop a training run)
            say_once(f"off: the store {uri} could not be used ({type(e).__name__}: {e})", WHO)
            return None
        import sys

        print(f"MLflow run {run_id} {verb}: {uri}", file=sys.stderr, flush=True)
        logger = cls(client, run_id, run_dir)
        from trd_hpc.rundir import RunDir

        # the epochs an earlier process logged (a resumed run, `trd-hpc evaluate`)
        for row in RunDir(run_dir).history(skip_bad=True):
            if "epoch" in row:
                logger._epoch_keys.update(row)
                logger._last_step = max(logger._last_step, int(row["epoch"]))
        return logger

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._failed = True
            say_once(f"stopped: {what} failed ({type(e).__name__}: {e}); training goes on without MLflow", WHO)

    def _metrics(self, values: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in finite_metrics(values).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        step = int(row["epoch"])
        self._epoch_keys.update(row)
        self._guard("log", self._metrics, {k: v for k, v in row.items() if k != "epoch"}, step)
        self._last_step = max(self._last_step, step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        # At the last epoch's step (MLflow shows a metric's latest value as the run's figure);
        # the per-epoch keys (val.*, train.*) only as epochs, so their curves stay one point per
        # epoch, and a value only once (the summary is logged after training and again after
        # the evaluation).
        new = {
            k: v for k, v in finite_metrics(metrics).items() if k not in self._epoch_keys and self._summary.get(k) != v
        }
        self._summary.update(new)
        self._guard("summary", self._metrics, new, self._last_step)

    def log_figures(self, figures: Mapping[str, Path | str], step: int | None = None) -> None:
        for p in figures.values():
            if Path(p).is_file():
                self._guard("log_figures", self.client.log_artifact, self.run_id, str(p), "figures")

    def finish(self, exit_code: int | None = None) -> None:
        status = "FINISHED" if not exit_code else "FAILED"
        self._guard("finish", self.client.set_terminated, self.run_id, status)

    @staticmethod
    def read_back(run_dir: Path) -> dict | None:
        """The run's metrics from its store (``Logger.read_back``): one row per step (the epoch)
        of the keys logged per epoch, and the latest value of every key as the summary.  None
        without mlflow_run.json or the mlflow package."""
        record = Path(run_dir) / RUN_RECORD
        if not record.is_file():
            return None
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            return None
        rec = json.loads(record.read_text())
        client = MlflowClient(tracking_uri=rec["tracking_uri"])
        run = client.get_run(rec["run_id"])
        by_step: dict[int, dict] = {}
        for key in run.data.metrics:
            history = client.get_metric_history(rec["run_id"], key)
            if len(history) < 2 and not key.startswith(("val.", "train.")):
                continue  # a final metric (logged once, at the last epoch's step)
            for m in history:
                by_step.setdefault(int(m.step), {"epoch": int(m.step)})[key] = float(m.value)
        return {"history": [by_step[k] for k in sorted(by_step)], "summary": dict(run.data.metrics)}
