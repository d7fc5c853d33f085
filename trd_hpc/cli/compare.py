"""``trd-hpc compare RUN_DIR...``."""

from __future__ import annotations

from trd_hpc.cli.common import verb

DESCRIPTION = """\
Compare run directories from their files alone: final metrics (metrics.json), the config
keys that differ (config.yaml), learning curves per epoch (metrics.jsonl) as a PNG, and the
`wandb sync` lines that upload their offline W&B runs, the baselines' (RUN/baselines/NAME)
included.

The PNG has one panel per validation curve of the task (val.loss, val.auc, ...): each run's
val.* line solid, its train.* twin dashed in the same colour, and its best epoch
(metrics.json best_epoch) as a dotted vertical line and a ring on the val.* line.

--csv and --markdown write the final-metrics table with one row per run, one column per
metric, then one config.KEY column per config key that differs: CSV at full precision (for a
spreadsheet), Markdown as on screen (for a README).  FILE "-" is stdout; the report then goes
to stderr, so that e.g. `trd-hpc compare runs/ --csv - > runs.csv` holds the table alone.

examples:
  trd-hpc compare runs/lr-small runs/lr-big --out cmp.png
  trd-hpc compare runs/ --group sweep-a --csv sweep-a.csv --markdown -
"""


def _compare(a) -> int:
    from trd_hpc.compare import compare

    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()] if a.metrics else None
    compare(
        a.runs,
        group=a.group,
        out=a.out,
        metrics=metrics,
        csv_file=a.csv,
        markdown_file=a.markdown,
    )
    return 0


def add_parsers(sub) -> None:
    c = verb(
        sub,
        "compare",
        _compare,
        help="compare runs: final metrics, differing config keys, overlaid learning curves (no W&B needed)",
        description=DESCRIPTION,
    )
    c.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories to search for run directories"
    )
    c.add_argument("--group", default=None, help="only runs whose config has tracking.group == NAME")
    c.add_argument(
        "--out",
        default=None,
        help="write the learning curves to this PNG: validation solid, training dashed, best epoch dotted "
        "(default: none; nothing is written into the working directory unasked)",
    )
    c.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics.json keys (globs allowed, e.g. 'test.*,calibrated.platt.*'); "
        "default: the test.* scalars, best_epoch and epochs_run",
    )
    c.add_argument(
        "--csv",
        default=None,
        metavar="FILE",
        help="also write the final-metrics table as CSV (one row per run, numbers at full precision); '-': stdout",
    )
    c.add_argument(
        "--markdown",
        default=None,
        metavar="FILE",
        help="also write the final-metrics table as a Markdown table (numbers as on screen); '-': stdout",
    )
