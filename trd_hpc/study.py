"""``trd-hpc study missing-genotypes``: the EMT's test AUC as genotypes go missing (0, 30 and
60 % of subjects by default), keeping the subjects without them (their genotypes replaced by the
missing token) against leaving them out of training (``data.complete_cases=[genotypes]``);
every cell is a run trained for it.

One cohort per rate (``cohort.missing.snp``) is shared by the two arms, so both see the same
subjects' data and are scored on the same test subjects: complete_cases filters the train and
val splits only.  The splits depend on the seed and the labels alone, so the test split is the
same at every rate too; the manifests are compared to say so.  Each cell is ``trd-hpc train ...
--no-eval`` then ``trd-hpc evaluate --no-figures``, run through ``trd_hpc.recipe.run_stages``
(a rerun skips the finished ones), and every number of the table is read from the runs'
``metrics.json`` (``OUT/missing_genotypes.json`` names the file and key behind each).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from trd_hpc.fsio import atomic_write_json, atomic_write_text
from trd_hpc.recipe import ReproduceError, Sources, Stage, fmt, run_stages
from trd_hpc.rundir import read_json

CONFIG = "emt_missing_genotypes"  # the packaged config (configs/emt_missing_genotypes.yaml)
RATES = (0.0, 0.3, 0.6)
ARMS = ("keep", "drop")
STATE = "study.json"
WITH, WITHOUT = "fmri+genotypes+clinical", "fmri+clinical"  # the test patterns (tasks/emt/evaluate.py)


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def tag(rate: float) -> str:
    """The folder name of a rate's cohort and runs: ``snp30`` for 0.3."""
    return f"snp{round(rate * 100):02d}"


def check_rates(rates) -> tuple[float, ...]:
    rates = tuple(float(r) for r in rates)
    bad = [r for r in rates if not 0 <= r < 1]
    if not rates or bad or len({tag(r) for r in rates}) != len(rates):
        raise ReproduceError(
            f"--rates {','.join(f'{r:g}' for r in rates)}: give distinct fractions in [0, 1) (0,0.3,0.6), "
            "at least one, two decimals at most"
        )
    return rates


def stages(out: Path, config: str, rates, overrides) -> list[Stage]:
    """Per rate: its cohort, then per arm the training run and its evaluation."""
    out_list = []
    for r in rates:
        t = tag(r)
        data = f"{out}/data/{t}"
        common = [f"cohort.missing.snp={r:g}", *overrides]
        out_list.append(
            Stage(f"generate-{t}", ("generate", config, "--out", data, *common), (f"data/{t}/manifest.json",))
        )
        for arm in ARMS:
            run, rel = f"{out}/runs/{t}-{arm}", f"runs/{t}-{arm}"
            drop = ["data.complete_cases=[genotypes]"] if arm == "drop" else []
            args = ("train", config, "--out", run, "--resume", "auto", "--no-eval", "--quiet", f"data.cohort={data}")
            out_list.append(
                Stage(
                    f"train-{t}-{arm}",
                    (*args, "tracking.wandb=false", *drop, *common),
                    (f"{rel}/model.pt", f"{rel}/metrics.json"),
                )
            )
            out_list.append(Stage(f"evaluate-{t}-{arm}", ("evaluate", run, "--no-figures"), (f"{rel}/bundle",)))
    return out_list


def _auc(src: Sources, file: str, prefix: str) -> dict:
    """AUC and subjects of one test population (the whole split, or one modality pattern)."""
    n = src.get(file, f"{prefix}.n")
    auc = src.get(file, f"{prefix}.auc")
    too_few = bool(src.has(file, f"{prefix}.too_few") and src.get(file, f"{prefix}.too_few")) or n < 10
    return {"auc": auc, "n": n, "too_few": too_few}


def _arm(src: Sources, rate: float, arm: str) -> dict:
    file = f"runs/{tag(rate)}-{arm}/metrics.json"
    src.used = []
    cell = {
        "run": f"runs/{tag(rate)}-{arm}",
        "test": _auc(src, file, "test"),
        "train_subjects": src.get(file, "train.subjects"),
        "val_subjects": src.get(file, "val.subjects"),
        "left_out": (src.get(file, "train.left_out") + src.get(file, "val.left_out")) if arm == "drop" else 0,
    }
    if not src.keys(file, "test.by_modality."):  # a cohort where no subject lacks a modality
        cell["with_genotypes"], cell["without_genotypes"] = cell["test"], None
    for name, pattern in (("with_genotypes", WITH), ("without_genotypes", WITHOUT)):
        key = f"test.by_modality.{pattern}"
        if src.has(file, f"{key}.n"):
            cell[name] = _auc(src, file, key)
        elif name not in cell:
            cell[name] = None
    cell["sources"] = src.used
    return cell


def show(a: dict | None) -> str:
    """``0.912 (n=70)``; ``- (n=6, too few)`` where the AUC is not reported; ``none`` without subjects."""
    if a is None:
        return "none"
    return f"{fmt(a['auc'])} (n={a['n']}{', too few' if a['too_few'] else ''})"


HEADER = (
    "| genotypes missing | train + val subjects, keep / drop | keep: test AUC | drop: test AUC "
    "| keep: with / without genotypes | drop: with / without genotypes |"
)


def markdown_row(rate: float, keep: dict, drop: dict) -> str:
    subjects = f"{keep['train_subjects']} + {keep['val_subjects']} / {drop['train_subjects']} + {drop['val_subjects']}"
    split = [f"{show(c['with_genotypes'])} / {show(c['without_genotypes'])}" for c in (keep, drop)]
    return (
        f"| {rate * 100:.0f} % | {subjects} | {show(keep['test'])} | {show(drop['test'])} | {split[0]} | {split[1]} |"
    )


def _test_split(out: Path, rates) -> list[int]:
    """The test split, the same in every rate's manifest (else an error: no comparison)."""
    splits = {r: read_json(out / "data" / tag(r) / "manifest.json", "manifest")["splits"]["test"] for r in rates}
    first = splits[rates[0]]
    differ = [f"{r:g}" for r, s in splits.items() if sorted(s) != sorted(first)]
    if differ:
        raise ReproduceError(
            f"the test split differs between the cohorts of rates {rates[0]:g} and {', '.join(differ)}"
        )
    return sorted(first)


def write_table(out: Path, command: str, config: str, rates, overrides) -> tuple[Path, str]:
    """OUT/missing_genotypes.md and .json from the finished runs; the Markdown."""
    from trd_hpc.config import load_config

    cfg = load_config(config, [f"cohort.missing.snp={rates[0]:g}", *overrides])
    co, src = cfg.cohort, Sources(out)
    test = _test_split(out, rates)
    rows = [{"rate": r, **{arm: _arm(src, r, arm) for arm in ARMS}} for r in rates]
    split = read_json(out / "data" / tag(rates[0]) / "manifest.json", "manifest")["splits"]
    sizes = "/".join(str(len(split[k])) for k in ("train", "val", "test"))
    lines = [
        "# Missing genotypes: keep the subjects (missing token) or drop them from training",
        "",
        f"`{command}`",
        "",
        f"Cohort: `{config}`{' with ' + ' '.join(overrides) if overrides else ''}, synthetic EMT, cohort.seed "
        f"{co.seed}, train.seed {cfg.train.seed}, {co.n_subjects} subjects (train/val/test {sizes}), "
        f"{co.snp.n_predictive} predictive SNPs of {co.snp.n_snps}; at most {cfg.train.max_epochs} epochs "
        f"(early stopping on val.auc). keep: every subject, absent genotypes as the EMT's missing token; drop: "
        "`data.complete_cases=[genotypes]`, subjects without genotypes left out of train and val (the model "
        "still has the token, untrained, which test subjects without genotypes get). The test split is never "
        f"filtered: the same {len(test)} test subjects in every cell (the manifests' test splits are equal), "
        "so the AUCs compare. An AUC over fewer than 10 subjects or one class is not reported (too few).",
        "",
        HEADER,
        "|---|---|---|---|---|---|",
        *(markdown_row(row["rate"], row["keep"], row["drop"]) for row in rows),
        "",
    ]
    md = "\n".join(lines)
    atomic_write_text(out / "missing_genotypes.md", md)
    record = {
        "study": "missing-genotypes",
        "command": command,
        "config": config,
        "overrides": list(overrides),
        "cohort_seed": co.seed,
        "train_seed": cfg.train.seed,
        "subjects": co.n_subjects,
        "splits": {k: len(split[k]) for k in ("train", "val", "test")},
        "test_subjects": test,
        "rows": rows,
    }
    atomic_write_json(out / "missing_genotypes.json", record)
    return out / "missing_genotypes.md", md


def missing_genotypes(
    out: str | Path, config: str = CONFIG, rates=RATES, overrides=(), progress: bool = True
) -> tuple[Path, str]:
    """Generate, train and evaluate every cell into ``out``; the table's path and Markdown."""
    out, rates, overrides = Path(out), check_rates(rates), list(overrides)
    bad = [o for o in overrides if o.split("=", 1)[0] in ("cohort.missing.snp", "data.cohort", "data.complete_cases")]
    if bad:
        raise ReproduceError(f"{', '.join(bad)}: the study sets these itself (per rate and arm)")
    command = shlex.join(
        ["trd-hpc", "study", "missing-genotypes", "--out", str(out)]
        + (["--config", config] if config != CONFIG else [])
        + (["--rates", ",".join(f"{r:g}" for r in rates)] if rates != RATES else [])
        + overrides
    )
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    state = read_json(state_path, "study state") if state_path.exists() else {"study": "missing-genotypes"}
    if state.get("study") != "missing-genotypes":
        raise ReproduceError(f"{state_path}: this directory holds another study or reproduction; use another --out")
    run_stages(stages(out, config, rates, overrides), out, state, state_path, progress, f"{command}", say=_say)
    path, md = write_table(out, command, config, rates, overrides)
    _say(f"table: {path} (and {path.with_suffix('.json').name})")
    return path, md
