"""Every verb and every flag of ``trd-hpc`` says what it does in ``--help`` (the parser tree walked)."""

from __future__ import annotations

import argparse

from trd_hpc.cli import build_parser


def _undocumented(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    out.append(f"{' '.join(path + [name])}: no one-line help in its parent's list")
                if not sub.description and not helps.get(name):
                    out.append(f"{' '.join(path + [name])}: no description")
                out += _undocumented(sub, path + [name])
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            out.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}: no help")
    return out


def test_every_verb_and_flag_has_help():
    parser = build_parser()
    missing = _undocumented(parser, ["trd-hpc"])
    assert not missing, "\n".join(missing)
    # the walk reached the leaves it must
    text = parser.format_help()
    assert "ingest" in text and "predict" in text


def test_the_walk_catches_a_flag_without_help():
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers()
    v = sub.add_parser("verb", help="does a thing")
    v.add_argument("--flag")
    assert _undocumented(p, ["x"]) == ["x verb --flag: no help"]
