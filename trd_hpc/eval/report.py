"""A single self-contained HTML report per run (figures inlined as base64 PNG, so the one
file can be mailed or attached to a ticket), rendered from ``templates/report.html.j2``.

Top to bottom: the summary table (the headline metrics of the model and of its baselines,
each with a bootstrap 95 % CI over the test subjects, beside the paper's figure), then the
task's sections (its tables and figures, e.g. calibration), figures no section placed, and
folded away at the end the full flat metric list and the config.  What a task puts in the
summary and the sections it returns from its registry entry's ``report``
(:class:`ReportParts`); a task without one gets the metric list and its figures.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from trd_hpc.config import flatten

# Groups shown first, in this order; everything else follows alphabetically.
GROUP_ORDER = ("test", "calibrated", "baselines", "val", "train", "importance", "cv")
# Lists longer than this (curve arrays) are summarised rather than printed.
MAX_LIST = 12
# A figure whose PNG is wider than this (px) takes a whole row; narrower ones go two abreast.
WIDE_PX = 620
N_BOOT, SEED = 1000, 0
DASH = "\u2014"  # a cell with nothing to show: the metric does not apply to that model


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, int):
        return str(v)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar
        return format_value(v.item())
    if isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
        v = list(v.tolist() if hasattr(v, "tolist") else v)
        if len(v) > MAX_LIST:
            return f"[{len(v)} values]"
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


# --------------------------------------------------------------------------- what a task gives
@dataclass(frozen=True)
class Cell:
    text: str
    ci: str = ""  # "[lo, hi]", shown after the value
    best: bool = False  # the best model of its row (bold)
    num: bool = True  # right-aligned figures; False: text, left-aligned


@dataclass(frozen=True)
class Table:
    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[Cell]]  # the first cell of a row is its header
    kind: str = ""  # CSS class and data-table attribute: summary, calibration, confusion, per-class


@dataclass(frozen=True)
class Section:
    title: str
    tables: Sequence[Table] = ()
    figures: Sequence[str] = ()  # names in figures/index.json
    text: str = ""
    # "beside": the tables take the first cell of the figure grid (next to the first figure);
    # "above": a full-width row of their own
    tables_at: Literal["above", "beside"] = "above"


@dataclass
class ReportParts:
    summary: Table | None = None
    sections: list[Section] = field(default_factory=list)
    captions: Mapping[str, str] = field(default_factory=dict)  # figure name -> what it shows
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Statistic:
    """One row of the summary table: ``fn(*arrays)`` over a column's per-subject arrays
    (``nan`` where undefined, e.g. AUC of one class)."""

    key: str  # the metrics.json suffix (test.KEY), also the key of the paper's figure
    label: str
    fn: Callable[..., float]
    digits: int = 3
    better: Literal["high", "low"] = "high"
    needs: str | None = None  # a baseline gets the row when its scored_on holds this (default: key)


@dataclass(frozen=True)
class Column:
    """One model of the summary table: its test predictions as per-subject arrays."""

    name: str
    arrays: tuple
    scored_on: tuple[str, ...] | None = None  # what the model is scored on; None: everything


def baseline_columns(cfg, run, arrays, scored_on: dict) -> tuple[list[Column], list[str]]:
    """A summary column per baseline of the config whose test predictions are in the run
    (``arrays(predictions)`` gives the column's per-subject arrays; ``scored_on``: what each
    baseline is scored on, TaskSpec.baselines), and a note for each left out."""
    cols, notes = [], []
    for b in cfg.eval.baselines:
        brun = run.baseline(b)
        if not brun.predictions_file("test").is_file():
            notes.append(f"baseline {b}: no test predictions in {brun.path}, left out of the summary")
            continue
        cols.append(Column(_label(b), arrays(brun.predictions("test")), scored_on.get(b)))
    return cols, notes


# --------------------------------------------------------------------------- tables
def _label(name: str) -> str:
    return name.replace("_", " ")  # partial_responder -> partial responder


def _number(v: float, digits: int) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary_table(
    stats: Sequence[Statistic],
    columns: Sequence[Column],
    paper: Mapping[str, float] | None = None,
    paper_label: str = "paper",
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> Table:
    """Metric x model, each cell the value on the test split and its percentile bootstrap
    95 % CI over test subjects (``metrics.bootstrap_ci``: the same seed, the same report),
    the best model of a row in bold, the paper's figure last."""
    from trd_hpc.eval.metrics import bootstrap_ci, ci_too_small

    n = len(columns[0].arrays[0]) if columns and columns[0].arrays else 0
    too_small = ci_too_small(n)
    values: list[dict[str, tuple[float, tuple | None]]] = []
    for col in columns:
        mine = [s for s in stats if col.scored_on is None or (s.needs or s.key) in col.scored_on]
        cis = bootstrap_ci({s.key: s.fn for s in mine}, *col.arrays, n_boot=n_boot, seed=seed)
        values.append({s.key: (float(s.fn(*col.arrays)), cis[s.key]) for s in mine})
    rows = []
    for s in stats:
        points = [v[s.key][0] for v in values if s.key in v and math.isfinite(v[s.key][0])]
        best = (max if s.better == "high" else min)(points) if len(points) > 1 else None
        row = [Cell(s.label)]
        for v in values:
            if s.key not in v:
                row.append(Cell(DASH))
                continue
            point, ci = v[s.key]
            ci_text = (
                f"[{_number(ci[0], s.digits)}, {_number(ci[1], s.digits)}]" if ci else ("no CI" if too_small else "")
            )
            row.append(Cell(_number(point, s.digits), ci_text, best=best is not None and point == best))
        if paper is not None:
            row.append(Cell(f"{paper[s.key]:.2f}" if s.key in paper else DASH))
        rows.append(row)
    caption = (
        f"Test split, {n} subjects: value [95 % CI], a percentile bootstrap over test subjects "
        f"({n_boot} resamples, seed {seed}); {DASH}: not a metric of that model."
        if not too_small
        else f"Test split, {n} subjects: values only; no confidence intervals ({too_small}), so no "
        f"difference between these models is established by this table. {DASH}: not a metric of that model."
    )
    header = ["metric", *(c.name for c in columns)] + ([paper_label] if paper is not None else [])
    return Table(caption, header, rows, kind="summary")


def per_class_table(y, pred, class_names: Sequence[str], caption: str) -> Table:
    """Precision, recall, F1, support and predicted count per class (sklearn's)."""
    from sklearn.metrics import precision_recall_fscore_support

    y, pred = np.asarray(y).reshape(-1), np.asarray(pred).reshape(-1)
    labels = list(range(len(class_names)))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    rows = [
        [Cell(name), Cell(f"{prec[k]:.3f}"), Cell(f"{rec[k]:.3f}"), Cell(f"{f1[k]:.3f}"), Cell(str(int(sup[k])))]
        + [Cell(str(int((pred == k).sum())))]
        for k, name in enumerate(map(_label, class_names))
    ]
    return Table(caption, ["class", "precision", "recall", "F1", "support", "predicted"], rows, kind="per-class")


def confusion_table(cm, class_names: Sequence[str]) -> Table:
    """Counts, true class by row and predicted by column."""
    cm = np.asarray(cm, dtype=int)
    names = [_label(n) for n in class_names]
    rows = [[Cell(name), *(Cell(str(v)) for v in cm[i])] for i, name in enumerate(names)]
    caption = f"Confusion matrix (test, {int(cm.sum())} subjects): rows true class, columns predicted."
    return Table(caption, ["true \\ predicted", *names], rows, kind="confusion")


# --------------------------------------------------------------------------- page
def _metric_groups(metrics: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, v in flatten(metrics).items():
        head, _, rest = key.partition(".")
        # A top-level scalar (no dot) goes to a "summary" group.
        group, name = (head, rest) if rest else ("summary", head)
        groups.setdefault(group, []).append((name, format_value(v)))

    def rank(g: str) -> tuple[int, str]:
        if g == "summary":
            return (-1, "")
        return (GROUP_ORDER.index(g), "") if g in GROUP_ORDER else (len(GROUP_ORDER), g)

    return [(g, groups[g]) for g in sorted(groups, key=rank)]


def _png_width(data: bytes) -> int:
    # A PNG's IHDR chunk: width and height as big-endian uint32 at bytes 16-24.
    return struct.unpack(">I", data[16:20])[0] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 else 0


def _figure(name: str, path: Path, caption: str) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"name": name, "caption": caption, "missing": str(path)}
    data = path.read_bytes()
    return {
        "name": name,
        "caption": caption,
        "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
        "wide": _png_width(data) > WIDE_PX,
    }


def _sections(parts: ReportParts, figures: Mapping[str, Path]) -> list[dict]:
    """The task's sections with their figures inlined, then one for the figures none placed."""
    out, placed = [], set()
    for sec in parts.sections:
        figs = [_figure(n, figures[n], parts.captions.get(n, "")) for n in sec.figures if n in figures]
        placed.update(sec.figures)
        if sec.tables or figs or sec.text:
            out.append({"title": sec.title, "text": sec.text, "tables": list(sec.tables), "figures": figs})
            out[-1]["tables_wide"] = sec.tables_at == "above" or not figs
    rest = [_figure(n, p, parts.captions.get(n, "")) for n, p in figures.items() if n not in placed]
    if rest:
        title = "More figures" if out else "Figures"
        out.append({"title": title, "text": "", "tables": [], "figures": rest, "tables_wide": True})
    for i, sec in enumerate(out):
        sec["id"] = f"s{i + 1}"
    return out


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape: titles, metric names and the config come from the user's files
    return Environment(
        loader=PackageLoader("trd_hpc.eval", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def write_report(
    run_dir: Path,
    title: str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, Path],
    config_yaml: str,
    notes: Sequence[str] = (),
    parts: ReportParts | None = None,
    meta: Sequence[tuple[str, str]] = (),
    banner: tuple[str, str] | None = None,
) -> Path:
    """Render templates/report.html.j2 into ``run_dir/report.html`` and return its path."""
    from trd_hpc.fsio import atomic_write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = parts or ReportParts()
    groups = _metric_groups(metrics)
    doc = (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            run_dir=str(run_dir),
            generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            meta=list(meta),
            banner=banner,
            notes=[*notes, *parts.notes],
            summary=parts.summary,
            sections=_sections(parts, figures),
            metric_groups=groups,
            n_metrics=sum(len(items) for _, items in groups),
            config_yaml=config_yaml,
        )
    )
    out = run_dir / "report.html"
    atomic_write_text(out, doc)  # a reader never sees a half-written report
    return out
