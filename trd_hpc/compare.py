"""``trd-hpc compare RUN_DIR...``: several runs side by side, from their run directories alone.

* a table of final metrics (``metrics.json``; default the ``test.*`` scalars plus
  ``best_epoch`` and ``epochs_run``), one column per run;
* a table of the config keys (``config.yaml`` flattened to dotted keys) whose values
  differ between the runs;
* the learning curves (``metrics.jsonl``: ``val.loss`` and the task's main metric,
  ``val.auc`` for EMT, ``val.accuracy`` and ``val.severity_mae`` for the CNN) overlaid
  per epoch in one PNG, each with its ``train.*`` twin dashed in the run's colour and
  the run's best epoch as a dotted vertical line (and a ring on its validation point);
* the ``wandb sync`` lines that upload the runs' offline W&B data, their baselines'
  (``RUN/baselines/NAME/wandb/offline-run-*``) included;
* optionally the final-metrics table as CSV (full precision, for a spreadsheet) and as
  Markdown (numbers as on screen, for a README): one row per run, one column per metric,
  then one ``config.KEY`` column per differing config key.

No W&B server or package is needed (a run directory without ``metrics.jsonl`` falls
back to its offline W&B log when wandb is installed).  ``--group NAME`` keeps the runs
whose ``tracking.group`` is NAME; a directory that is not a run directory is searched
for run directories (not descending into a run's own ``baselines/``).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from trd_hpc.config import flatten
from trd_hpc.errors import ConfigError, RunDirError, WriteError
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
        return _offline_dirs(self.path)

    @property
    def baseline_offline_dirs(self) -> list[Path]:
        """The baselines' own offline W&B runs (RUN/baselines/NAME/wandb/offline-run-*):
        a separate list, since only the run's own log stands in for a missing metrics.jsonl."""
        root = self.path / "baselines"
        if not root.is_dir():
            return []
        return [d for b in sorted(root.iterdir()) if b.is_dir() for d in _offline_dirs(b)]

    @property
    def best_epoch(self) -> int | None:
        """metrics.json's best_epoch; for a run still training, the last epoch row's."""
        for v in (self.metrics.get("best_epoch"), (self.history[-1] if self.history else {}).get("best_epoch")):
            if _scalar(v) and not math.isnan(v) and v >= 1:
                return int(v)
        return None


def _offline_dirs(run_dir: Path) -> list[Path]:
    from trd_hpc.tracking import wandb_run_dirs

    return [d for d in wandb_run_dirs(run_dir) if d.name.startswith("offline-run-")]


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
    if not history:  # only a tracker's log came along (W&B, MLflow, metrics.csv): read it back
        from trd_hpc.tracking import read_back

        try:
            got = read_back(path)
        except Exception as e:  # noqa: BLE001
            print(f"{path}: no metrics.jsonl and its tracking log could not be read ({e})", file=sys.stderr)
            got = None
        if got is not None:
            name, rec = got
            print(f"{path}: no metrics.jsonl; its epochs read back from its {name} log", file=sys.stderr)
            run.history = rec["history"]
            if not metrics:
                run.metrics = dict(rec["summary"])
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


def cohort_note(runs: list[Run]) -> str | None:
    """What the table's figures rest on, when that is not one cohort: runs evaluated on
    different cohorts (another manifest), or on synthetic and real data side by side, are not
    comparable subject for subject, and a table that hides it invites the comparison."""
    from trd_hpc.data.manifest import identity_line

    idents = {}
    unknown = []
    for r in runs:
        ident = r.metrics.get("cohort")
        if isinstance(ident, dict) and ident.get("manifest_sha256"):
            idents.setdefault(ident["manifest_sha256"], (ident, []))[1].append(r.label)
        else:
            unknown.append(r.label)
    if len(idents) <= 1 and not (unknown and idents):
        return None
    parts = [f"{', '.join(labels)}: {identity_line(ident)}" for ident, labels in idents.values()]
    if unknown:
        parts.append(f"{', '.join(unknown)}: cohort not recorded")
    origins = {ident.get("origin") for ident, _ in idents.values()}
    mixed = " (synthetic and ingested side by side)" if {"synthetic", "ingested"} <= origins else ""
    return (
        f"note: these runs rest on {len(idents) + bool(unknown)} different cohorts{mixed}; their test metrics "
        "are not comparable subject for subject: " + "; ".join(parts)
    )


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


# ---------------------------------------------------------------------------- export
CONFIG_PREFIX = "config."  # config keys as columns: config.train.lr, apart from metrics such as train.mfu


def export_table(runs: list[Run], keys: Sequence[str], diff: dict[str, list[Any]]) -> tuple[list[str], list[list]]:
    """The final-metrics table turned for a spreadsheet: one row per run, raw values."""
    header = ["run", *keys, *(CONFIG_PREFIX + k for k in diff)]
    rows = [
        [r.label, *(r.metrics.get(k) for k in keys), *(vals[i] for vals in diff.values())] for i, r in enumerate(runs)
    ]
    return header, rows


def to_csv(header: list[str], rows: list[list]) -> str:
    from trd_hpc.tracking import csv_cell  # the same cells as metrics.csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([csv_cell(v) for v in row] for row in rows)
    return buf.getvalue()


def _md_cell(v: Any) -> str:
    return (v if isinstance(v, str) else _fmt(v)).replace("|", "\\|").replace("\n", " ")


def to_markdown(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured table, numbers as on screen, padded so the source reads as a table too."""
    cells = [[_md_cell(h) for h in header]] + [[_md_cell(v) for v in row] for row in rows]
    widths = [max(3, *(len(c) for c in col)) for col in zip(*cells)]

    def line(row: list[str]) -> str:
        return (
            "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
        )

    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])]) + "\n"


def check_target(option: str, target: str | Path | None) -> None:
    """Refuse an export path that cannot be written, in one line, before any work is done."""
    if target is None or str(target) == "-":
        return
    p = Path(target)
    if p.is_dir():
        raise WriteError(f"{option} {p}: is a directory; give a file name")
    parent = p.parent
    while not parent.exists():  # atomic_write_text creates the missing folders
        parent = parent.parent
    if not parent.is_dir():
        raise WriteError(f"{option} {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(f"{option} {p}: cannot write into {parent} (permission denied)")


def _emit(target: str | Path, text: str, what: str, file) -> None:
    if str(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from trd_hpc.fsio import atomic_write_text

    atomic_write_text(target, text)  # a reader (a spreadsheet open on it) never sees half a table
    print(f"{what}: {target}", file=file)


# ---------------------------------------------------------------------------- curves
def curve_keys(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in _curves(r.task):
            if k not in keys:
                keys.append(k)
    return keys


def train_key(key: str) -> str | None:
    """val.X's twin train.X: the trainer logs the task's metrics on both splits each epoch."""
    return "train." + key.removeprefix("val.") if key.startswith("val.") else None


def _points(history: list[dict], key: str) -> tuple[list, list]:
    pts = [
        (row.get("epoch", j + 1), row[key])
        for j, row in enumerate(history)
        if _scalar(row.get(key)) and not math.isnan(row[key])
    ]
    return [e for e, _ in pts], [v for _, v in pts]


def _record(line, run: Run, key: str, kind: str) -> dict:
    """What a drawn line shows, read back from the artist itself (tests check it, not pixels)."""
    from matplotlib.colors import to_hex

    return {
        "run": run.label,
        "key": key,
        "kind": kind,
        "color": to_hex(line.get_color()),
        "linestyle": line.get_linestyle(),
        "x": [float(x) for x in line.get_xdata()],
        "y": [float(y) for y in line.get_ydata()],
    }


def _draw_run(ax, run: Run, key: str, color: str) -> list[dict]:
    """One run on one panel: validation solid, training dashed, best epoch dotted (and ringed
    on the validation curve)."""
    drawn = []
    for k, kind, style in ((key, "val", "-"), (train_key(key), "train", "--")):
        x, y = _points(run.history, k) if k else ([], [])
        if x:
            (line,) = ax.plot(
                x,
                y,
                ls=style,
                marker="o" if kind == "val" else None,
                ms=3,
                lw=1.4,
                color=color,
                label="_nolegend_" if drawn else run.label,  # one legend entry per run
            )
            drawn.append(_record(line, run, k, kind))
    best = run.best_epoch
    if drawn and best is not None:
        line = ax.axvline(best, ls=":", lw=1.2, color=color, label="_nolegend_")
        drawn.append(_record(line, run, "best_epoch", "best epoch"))
        if drawn[0]["kind"] == "val" and best in drawn[0]["x"]:
            # runs sharing a best epoch share the vertical line too: the ring on each
            # run's own validation curve keeps them apart
            y = drawn[0]["y"][drawn[0]["x"].index(best)]
            (ring,) = ax.plot([best], [y], ls="none", marker="o", ms=8, mfc="none", mec=color, mew=1.3)
            drawn.append(_record(ring, run, key, "best point"))
    return drawn


def _legend(ax, drawn: list[dict]) -> list[str]:
    """Runs by colour, then one grey entry per line style (train, best epoch) in use."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    kinds = {d["kind"] for d in drawn}
    if "train" in kinds:
        handles.append(Line2D([], [], color="0.4", ls="--", lw=1.2))
        labels.append("train")
    if "best epoch" in kinds:
        ring = "best point" in kinds
        handles.append(Line2D([], [], color="0.4", ls=":", lw=1.2, marker="o" if ring else None, mfc="none", ms=7))
        labels.append("best epoch")
    ax.legend(handles, labels, fontsize=7)
    return labels


def plot_curves(runs: list[Run], out: Path, keys: Sequence[str] | None = None) -> tuple[Path, dict[str, dict]]:
    """The PNG, and per panel (validation key) its title, lines drawn and legend entries."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(keys or curve_keys(runs))
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    panels: dict[str, dict] = {}
    for ax, key in zip(axes, keys):
        drawn = [d for i, r in enumerate(runs) for d in _draw_run(ax, r, key, f"C{i % 10}")]
        title = f"{key} (and {train_key(key)})" if any(d["kind"] == "train" for d in drawn) else key
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        legend = _legend(ax, drawn) if drawn else []
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        panels[key] = {"title": title, "lines": drawn, "legend": legend}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    from trd_hpc.fsio import atomic_write_with

    atomic_write_with(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return out, panels


# ---------------------------------------------------------------------------- command
def sync_lines(runs: list[Run]) -> list[str]:
    """One `wandb sync` per offline W&B run: each run's own, then its baselines'."""
    return [f"wandb sync {d}" for r in runs for d in r.offline_dirs + r.baseline_offline_dirs]


def _print_config_diff(runs: list[Run], diff: dict[str, list[Any]], use_rich: bool | None, file) -> None:
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


def _print_sync(runs: list[Run], lines: list[str], file) -> None:
    if not lines:
        print(
            "\nno offline W&B runs in these run directories (tracking was off, or online runs are already uploaded)",
            file=file,
        )
        return
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


def compare(
    paths: Sequence[str | Path],
    group: str | None = None,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    file=None,
    use_rich: bool | None = None,
    csv_file: str | Path | None = None,
    markdown_file: str | Path | None = None,
) -> dict:
    """Print the tables and write the curves (and the CSV / Markdown exports; "-" is stdout,
    and then the report goes to stderr so that stdout holds the table alone); returns what
    was shown (for tests and scripts)."""
    check_target("--csv", csv_file)
    check_target("--markdown", markdown_file)
    to_stdout = "-" in (str(csv_file), str(markdown_file))
    file = file or (sys.stderr if to_stdout else sys.stdout)
    runs = select_runs(paths, group)
    keys = metric_keys(runs, metrics)
    header, rows = metrics_table(runs, keys)
    render_table(f"final metrics ({len(runs)} runs)", header, rows, use_rich, file)
    note = cohort_note(runs)
    if note:
        print(note, file=file)
    diff = config_diff(runs)
    if len(runs) > 1:
        _print_config_diff(runs, diff, use_rich, file)
    table = export_table(runs, keys, diff)
    texts = {"csv": to_csv(*table) if csv_file else None, "markdown": to_markdown(*table) if markdown_file else None}
    for target, what in ((csv_file, "csv"), (markdown_file, "markdown")):
        if target:
            _emit(target, texts[what], what, file)
    png, panels = plot_curves(runs, Path(out)) if out is not None else (None, {})
    print(f"learning curves: {png}" if png else "learning curves: not drawn (--out FILE.png draws them)", file=file)
    lines = sync_lines(runs)
    _print_sync(runs, lines, file)
    return {
        "runs": runs,
        "metric_keys": keys,
        "config_diff": diff,
        "png": png,
        "curves": panels,
        "best_epochs": {r.label: r.best_epoch for r in runs},
        "table": table,
        **texts,
        "sync": lines,
        "cohort_note": note,
    }
