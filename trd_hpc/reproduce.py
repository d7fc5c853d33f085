"""``trd-hpc reproduce paper000|paper001``: a paper's whole pipeline into one directory, then
``reproduction.md``, the paper's headline table beside ours.

Each stage is a ``trd-hpc`` command run as its own process, exactly as a user would type it
(the Markdown lists them with their wall times), so the reproduction is the README's commands
and nothing else.  ``reproduce.json`` records every finished stage; a rerun skips a stage whose
record and outputs are both there and runs the rest (a killed ``train`` resumes from its last
checkpoint, since every training stage passes ``--resume auto``).

Every figure in the ``trd-hpc`` column is read from the run's own files through ``Sources``,
which keeps, per table row, the file, key and value behind each number
(``reproduction.json``), so a test can check each number against the files.
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Callable

from trd_hpc.fsio import atomic_write_json, atomic_write_text
from trd_hpc.recipe import Recipe, ReproduceError, Sources, run_stages
from trd_hpc.rundir import read_json
from trd_hpc.train.plan import available_cpus

STATE = "reproduce.json"
SCALES = ("tiny", "paper")


def recipes() -> dict[str, Callable[[Path, str], Recipe]]:
    """{paper id: recipe} of every registered task that has one (TaskSpec.paper, .reproduce)."""
    from trd_hpc import tasks

    return {spec.paper: spec.reproduce for spec in map(tasks.get, tasks.names()) if spec.paper and spec.reproduce}


# ---------------------------------------------------------------------------------- the runner
def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def _check_state(state: dict, paper: str, scale: str, path: Path) -> None:
    have = (state.get("paper"), state.get("scale"))
    if have != (paper, scale):
        raise ReproduceError(
            f"{path}: this directory holds the {have[0]} reproduction at --scale {have[1]}; "
            f"use another --out for {paper} at --scale {scale}"
        )


def reproduce(paper: str, out: str | Path, scale: str = "tiny", progress: bool = True) -> Path:
    """Run (or continue) ``paper``'s stages into ``out`` and write ``out/reproduction.md``."""
    known = recipes()
    if paper not in known:
        raise ReproduceError(f"unknown paper {paper!r}; one of: {', '.join(sorted(known))}")
    if scale not in SCALES:
        raise ReproduceError(f"unknown --scale {scale!r}; one of: {', '.join(SCALES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = known[paper](out, scale)
    state_path = out / STATE
    state = read_json(state_path, "reproduction state") if state_path.exists() else {"paper": paper, "scale": scale}
    _check_state(state, paper, scale, state_path)
    run_stages(recipe.stages, out, state, state_path, progress, again="trd-hpc reproduce", say=_say)
    md = write_reproduction(recipe, out, scale, state)
    _say(f"table: {md}")
    return md


def table(recipe: Recipe, out: Path) -> tuple[list[dict], str]:
    """The rows (label, paper, ours, the sources behind ours) and their Markdown."""
    rows = []
    src = Sources(out)
    header = recipe.header(src)
    src.used.clear()
    for r in recipe.rows:
        src.used = []
        cell = r.ours(src)
        rows.append({"label": r.label, "paper": r.paper, "ours": cell, "sources": src.used})
    lines = [f"| {header} | {recipe.paper.replace('paper', 'paper ')} | trd-hpc |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['paper']} | {r['ours']} |" for r in rows]
    return rows, "\n".join(lines)


def write_reproduction(recipe: Recipe, out: Path, scale: str, state: dict) -> Path:
    rows, md_table = table(recipe, out)
    stages = state["stages"]
    total = sum(stages[s.name]["seconds"] for s in recipe.stages)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"# Reproduction of the {recipe.title}, --scale {scale}",
        "",
        f"`trd-hpc reproduce {recipe.paper} --out {out} --scale {scale}` on {platform.node()} "
        f"({platform.machine()}, {available_cpus()} CPUs), {when}. Every figure in the trd-hpc column is read "
        f"from this directory's `metrics.json` and `cv_summary.json` files; `reproduction.json` "
        "names the file and key behind each.",
        "",
        md_table,
        "",
    ]
    if recipe.reductions:
        lines += ["Reductions from the paper's settings: " + "; ".join(recipe.reductions) + ".", ""]
    lines += ["| stage | command | wall |", "|---|---|---|"]
    lines += [f"| {s.name} | `{s.command()}` | {_wall(stages[s.name])} |" for s in recipe.stages]
    lost = any(stages[s.name].get("interrupted") for s in recipe.stages)
    lines += [f"| total | | {total:.0f} s ({total / 60:.1f} min){' + uncounted' if lost else ''} |", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "reproduction.md", text)
    atomic_write_json(
        out / "reproduction.json",
        {"paper": recipe.paper, "scale": scale, "rows": rows, "stages": stages, "total_seconds": total},
    )
    return out / "reproduction.md"


def _wall(rec: dict) -> str:
    """A stage's wall time; attempts killed outright saved no time, so they are named rather
    than silently left out."""
    cell = f"{rec['seconds']:.0f} s"
    n = rec.get("interrupted", 0)
    if n:
        cell += f" + {n} killed attempt{'s' if n > 1 else ''} not counted"
    return cell
