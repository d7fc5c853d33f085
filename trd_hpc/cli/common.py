"""Pieces every verb's parser shares."""

from __future__ import annotations

import argparse

EPILOG = """\
Overrides are dotted key=value pairs after the config, e.g.
  trd-hpc generate configs/emt.yaml --out /data/emt cohort.n_subjects=20000 cohort.fmri.dtype=float32
An unknown key or a value of the wrong type is an error that names the key.
"""


def add_overrides(p: argparse.ArgumentParser, help: str = "dotted config overrides") -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help)


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--generate",
        action="store_true",
        help="make a synthetic cohort at data.cohort from the config's cohort section when none is there "
        "(data.generate=true); without it a missing data.cohort is an error, so a mistyped path never trains "
        "on synthetic data",
    )


def verb(sub, name: str, func, **kw) -> argparse.ArgumentParser:
    """A sub-command whose description keeps its line breaks."""
    p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    p.set_defaults(func=func)
    return p


def format_final(metrics: dict, keys) -> str:
    shown = [k for k in keys if k in metrics]
    return "final: " + "  ".join(
        f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in shown
    )
