"""``tracking.csv: true``: ``RUN_DIR/metrics.csv`` on rank 0, W&B on or off: the epoch rows as
one table for a spreadsheet, for sites where clinical data may not leave and W&B is off
(``metrics.jsonl`` holds the same rows as JSON)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

from trd_hpc.tracking.base import say_once

CSV_HISTORY = "metrics.csv"


def csv_cell(v: Any) -> str:
    """One CSV cell: numbers at full precision, None empty, lists and dicts as JSON."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # full precision (nan, inf as Python writes them)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


class CsvHistory:
    """``RUN_DIR/metrics.csv``: one row per epoch, one column per key in the order keys
    first appear (a key that appears later gets its column then, empty in earlier rows).
    Rewritten whole and atomically at each epoch: the history is small, and a reader (a
    spreadsheet, a copy to another site) never sees a torn file."""

    def __init__(self, path: Path, rows: list[Mapping[str, Any]] = ()):
        self.path = Path(path)
        self.rows: dict[int, dict[str, str]] = {}
        self.columns: list[str] = []
        for r in rows:
            self._add(r)

    @classmethod
    def open(cls, run_dir: Path) -> "CsvHistory":
        """Seeded with the epochs already in metrics.jsonl (a resumed run logs only the next ones)."""
        from trd_hpc.rundir import RunDir

        return cls(Path(run_dir) / CSV_HISTORY, [r for r in RunDir(run_dir).history(skip_bad=True) if "epoch" in r])

    def _add(self, row: Mapping[str, Any]) -> None:
        for k in row:
            if k not in self.columns:
                self.columns.append(k)
        # a re-run epoch (resumed from the checkpoint before it) replaces the earlier row
        self.rows[int(row["epoch"])] = {k: csv_cell(v) for k, v in row.items()}

    def text(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows[e] for e in sorted(self.rows))
        return buf.getvalue()

    def log(self, row: Mapping[str, Any]) -> None:
        from trd_hpc.fsio import atomic_write_text

        self._add(row)
        atomic_write_text(self.path, self.text())


class CsvLogger:
    """The Logger of metrics.csv: epoch rows only (summary and figures have their own files)."""

    name = "csv"

    def __init__(self, run_dir: Path):
        self.history: CsvHistory | None = CsvHistory.open(run_dir)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        if self.history is None:
            return
        try:
            self.history.log(row)
        except OSError as e:  # WriteError included: like W&B, never a reason to stop training
            say_once(f"stopped: {e}; training goes on without metrics.csv", who="CSV metrics")
            self.history = None

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def log_figures(self, figures: Mapping[str, Path | str], step: int | None = None) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        pass

    @staticmethod
    def read_back(run_dir: Path) -> dict | None:
        """metrics.csv's rows as numbers again (``Logger.read_back``); None without the file."""
        path = Path(run_dir) / CSV_HISTORY
        if not path.is_file():
            return None
        rows = []
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row: dict[str, Any] = {}
                for k, cell in raw.items():
                    if cell in ("", None):
                        continue
                    try:
                        row[k] = json.loads(cell) if cell[0] in "[{" else float(cell)
                    except ValueError:
                        row[k] = cell
                if "epoch" in row:
                    row["epoch"] = int(row["epoch"])
                    rows.append(row)
        return {"history": rows, "summary": {}}
