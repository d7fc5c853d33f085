"""``trd-hpc compare RUN_DIR...``."""

from __future__ import annotations

from trd_hpc.cli.common import verb


def _compare(a) -> int:
    from trd_hpc.compare import compare

    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()] if a.metrics else None
    compare(a.runs, group=a.group, out=a.out or "compare.png", metrics=metrics)
    return 0


def add_parsers(sub) -> None:
    c = verb(
        sub,
        "compare",
        _compare,
        help="compare runs: final metrics, differing config keys, overlaid learning curves (no W&B needed)",
        description="Compare run directories from their files alone: final metrics (metrics.json), the "
        "config keys that differ (config.yaml), learning curves per epoch (metrics.jsonl) as a PNG, and "
        "the `wandb sync` lines that upload their offline W&B runs.",
    )
    c.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories to search for run directories"
    )
    c.add_argument("--group", default=None, help="only runs whose config has tracking.group == NAME")
    c.add_argument("--out", default="compare.png", help="PNG for the learning curves (default: ./compare.png)")
    c.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics.json keys (globs allowed, e.g. 'test.*,calibrated.platt.*'); "
        "default: the test.* scalars, best_epoch and epochs_run",
    )
