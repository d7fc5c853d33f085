"""``trd-hpc``: the command line.  The only place that parses arguments.

One module per group of verbs registers its parsers (``add_parsers(sub)``) and turns the
parsed options into a call of the experiment layer or of a domain function with typed
arguments; nothing below this package imports it.
"""

from __future__ import annotations

import argparse
import sys

from trd_hpc import __version__
from trd_hpc.cli import bench, data, predict, submit, tune
from trd_hpc.cli import compare as compare_cli
from trd_hpc.cli import experiment as experiment_cli

GROUPS = (data, experiment_cli, predict, compare_cli, submit, tune, bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trd-hpc",
        description="Synthetic multimodal cohorts and distributed training of the EMT and dual-path 3-D CNN.",
        epilog=data.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"trd-hpc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from trd_hpc.errors import TrdError

    parser = build_parser()
    # Overrides may come before or after the options (`generate CFG --out D k=v`).
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no KEY=VALUE overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    try:
        return int(args.func(args) or 0)
    except TrdError as e:
        # The project's own errors name the file or key and say what to do: one line.
        # Anything else (CUDA out of memory, NCCL, DeepSpeed, a bug) keeps its traceback,
        # since on a compute node the log is all a user has.
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # train/cv name what was kept and the command that continues
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
