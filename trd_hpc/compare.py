"""``trd-hpc compare RUN_DIR...``: several runs side by side, from their run directories alone.

* a table of final metrics (``metrics.json``; default the ``test.*`` scalars plus
  ``best_epoch`` and ``epochs_run``), one column per run;
* a table of the config keys (``config.yaml`` flattened to dotted keys) whose values
  differ between the runs;
* the learning curves (``metrics.jsonl``: ``val.loss`` and the task's main metric,
  ``val.auc`` for EMT, ``val.accuracy`` and ``val.severity_mae`` for the CNN) overlaid
  per epoch in one PNG;
* the ``wandb sync`` lines that upload the runs' offline W&B data.

No W&B server or package is needed (a run directory without ``metrics.jsonl`` falls
back to its offline W&B log when wandb is installed).  ``--group NAME`` keeps the runs
whose ``tracking.group`` is NAME; a directory that is not a run directory is searched
for run directories (not descending into a run's own ``baselines/``).
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from trd_hpc.config import flatten
from trd_hpc.errors import ConfigError, RunDirError
from trd_hpc.rundir import RunDir

DEFAULT_EXTRA = ["best_epoch", "epochs_run"]


@dataclass
class Run:
    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    label: str = ""

    @property
    def task(self) -> str:
        return str(self.config.get("task", ""))

    @property
    def group(self) -> Any:
        return (self.config.get("tracking") or {}).get("group")

    @property
    def offline_dirs(self) -> list[Path]:
        from trd_hpc.tracking import wandb_run_dirs

        return [d for d in wandb_run_dirs(self.path) if d.name.startswith("offline-run-")]


# ---------------------------------------------------------------------------- loading
def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file()


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path that is a run directory, or the run directories found under it."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise RunDirError(f"{p}: no such directory")
        if _is_run_dir(p):
            found.append(p)
            continue
        if not p.is_dir():
            raise RunDirError(f"{p}: not a run directory (no config.yaml)")
        stack = [p]
        under: list[Path] = []
        while stack:
            d = stack.pop()
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.is_symlink())
            except OSError:
                continue
            for c in children:
                if c.name in ("wandb", "checkpoints", "predictions", "figures") or c.name.startswith("."):
                    continue
                if _is_run_dir(c):
                    under.append(c)  # a run's baselines/ are its own, not searched
                else:
                    stack.append(c)
        if not under:
            raise RunDirError(f"{p}: not a run directory and no run directories (with config.yaml) under it")
        found.extend(sorted(under))
    seen, out = set(), []
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(p)
    return out


def _curves(task: str) -> list[str]:
    """The task's learning curves (its registry entry); val.loss for a task not registered here."""
    from trd_hpc.tasks import get

    try:
        return list(get(task).curves)
    except ConfigError:
        return ["val.loss"]


def load_run(path: Path) -> Run:
    cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    history = RunDir(path).history(skip_bad=True)  # what a torn last line leaves is still shown
    run = Run(path=path, config=cfg, metrics=metrics, history=history)
    if not history and run.offline_dirs:  # only the W&B log came along: read it back
        try:
            from trd_hpc.tracking import read_offline_run

            w = read_offline_run(path)
            run.history = [r for r in w["history"] if "epoch" in r]
            if not metrics:
                run.metrics = dict(w["summary"])
        except Exception as e:  # noqa: BLE001
            print(f"{path}: no metrics.jsonl and its W&B log could not be read ({e})", file=sys.stderr)
    return run


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def select_runs(paths: Sequence[str | Path], group: str | None = None) -> list[Run]:
    dirs = find_run_dirs(paths)
    runs = [load_run(p) for p in dirs]
    if group is not None:
        runs = [r for r in runs if r.group == group]
        if not runs:
            raise ConfigError(f"no run among {', '.join(map(str, dirs))} has tracking.group == {group!r}")
    for r, lab in zip(runs, _labels([r.path for r in runs])):
        r.label = lab
    return runs


# ---------------------------------------------------------------------------- tables
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_keys(runs: list[Run], patterns: Sequence[str] | None = None) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in r.metrics:
            if k not in keys:
                keys.append(k)
    if patterns:
        out = []
        for pat in patterns:
            hits = [k for k in keys if fnmatch.fnmatchcase(k, pat)] if any(c in pat for c in "*?[") else [pat]
            out += [k for k in hits if k not in out]
        return out
    test = sorted(k for k in keys if k.startswith("test.") and any(_scalar(r.metrics.get(k)) for r in runs))
    return test + [k for k in DEFAULT_EXTRA if any(k in r.metrics for r in runs)]


def metrics_table(runs: list[Run], keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["metric"] + [r.label for r in runs]
    rows = [[k] + [_fmt(r.metrics.get(k)) for r in runs] for k in keys]
    return header, rows


_MISSING = object()


def config_diff(runs: list[Run]) -> dict[str, list[Any]]:
    """dotted key -> each run's value, for the keys whose values differ (or are missing in some)."""
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    out = {}
    for k in keys:
        vals = [f.get(k, _MISSING) for f in flats]
        if any(not _same(vals[0], v) for v in vals[1:]):
            out[k] = [None if v is _MISSING else v for v in vals]
    return out


def _same(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def render_table(title: str, header: list[str], rows: list[list[str]], use_rich: bool | None = None, file=None) -> None:
    file = file or sys.stdout
    if use_rich is None:
        use_rich = bool(getattr(file, "isatty", lambda: False)())
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    if use_rich:
        t = Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            t.add_row(*row)
        Console(file=file).print(t)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(title, file=file)
    print(line(header), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in rows:
        print(line(row), file=file)
    print(file=file)


# ---------------------------------------------------------------------------- curves
def curve_keys(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in _curves(r.task):
            if k not in keys:
                keys.append(k)
    return keys


def plot_curves(runs: list[Run], out: Path, keys: Sequence[str] | None = None) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(keys or curve_keys(runs))
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        plotted = False
        for i, r in enumerate(runs):
            pts = [
                (row.get("epoch", j + 1), row[key])
                for j, row in enumerate(r.history)
                if _scalar(row.get(key)) and not math.isnan(row[key])
            ]
            if pts:
                e, v = zip(*pts)
                ax.plot(e, v, marker="o", ms=3, lw=1.4, color=f"C{i % 10}", label=r.label)
                plotted = True
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    from trd_hpc.fsio import atomic_write_with

    atomic_write_with(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return out


# ---------------------------------------------------------------------------- command
def sync_lines(runs: list[Run]) -> list[str]:
    return [f"wandb sync {d}" for r in runs for d in r.offline_dirs]


def compare(
    paths: Sequence[str | Path],
    group: str | None = None,
    out: str | Path = "compare.png",
    metrics: Sequence[str] | None = None,
    file=None,
    use_rich: bool | None = None,
) -> dict:
    """Print the tables and write the curves; returns what was shown (for tests and scripts)."""
    file = file or sys.stdout
    runs = select_runs(paths, group)
    keys = metric_keys(runs, metrics)
    header, rows = metrics_table(runs, keys)
    render_table(f"final metrics ({len(runs)} runs)", header, rows, use_rich, file)
    diff = config_diff(runs)
    if len(runs) > 1:
        if diff:
            render_table(
                "config keys that differ",
                ["key"] + [r.label for r in runs],
                [[k] + [_fmt(v) for v in vals] for k, vals in diff.items()],
                use_rich,
                file,
            )
        else:
            print("configs: identical\n", file=file)
    png = plot_curves(runs, Path(out))
    print(f"learning curves: {png}", file=file)
    lines = sync_lines(runs)
    if lines:
        projects = sorted({str((r.config.get("tracking") or {}).get("project", "trd-hpc")) for r in runs})
        groups = sorted({str(r.group) for r in runs if r.group})
        print("\nupload the offline W&B runs (needs network and `wandb login` or WANDB_API_KEY):", file=file)
        for line in lines:
            print(f"  {line}", file=file)
        where = f"project {', '.join(projects)}"
        if groups:
            where += f", group {', '.join(groups)} (Group by: Group)"
        print(
            f"then compare them in the W&B web interface: {where}; select the runs in the Runs table "
            f"and their charts overlay.",
            file=file,
        )
    else:
        print(
            "\nno offline W&B runs in these run directories (tracking was off, or online runs are already uploaded)",
            file=file,
        )
    return {"runs": runs, "metric_keys": keys, "config_diff": diff, "png": png, "sync": lines}
