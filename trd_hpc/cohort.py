"""Which cohort a run reads: an ingested cohort's own description taken from its manifest,
a synthetic one generated only when the config asks for it, and a refusal of a cohort
directory made with another config.  The experiment layer calls it before a training run
starts (``trd_hpc.experiment.train_run``); ``cv`` and ``tune`` before theirs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trd_hpc.config import ConfigError, to_dict
from trd_hpc.console import say
from trd_hpc.data.generate import check_target_dir, generate
from trd_hpc.data.manifest import MANIFEST, load_manifest
from trd_hpc.train import distributed as D
from trd_hpc.train.identity import flatten

if TYPE_CHECKING:
    from trd_hpc.config import ExperimentConfig


def resolve_cohort(cfg: "ExperimentConfig") -> "ExperimentConfig":
    """``cfg`` with its ``cohort`` section taken from the manifest when ``data.cohort`` is an
    ingested cohort (``trd-hpc ingest``): real data describes itself (grid, frames, SNPs,
    clinical columns, classes), so a config written for synthetic data trains on it as it
    is.  Generated cohorts are left alone (their config must match, see ensure_cohort)."""
    from trd_hpc.config import derive
    from trd_hpc.data.kinds import kind_of

    root = Path(cfg.data.cohort)
    if not (root / MANIFEST).is_file():
        if not kind_of(cfg.cohort).generated:
            raise ConfigError(
                f"data.cohort={root}: no manifest.json, and an ingested cohort cannot be generated from the "
                f"config; run `trd-hpc ingest SPEC.yaml --out {root}` again"
            )
        if not cfg.data.generate:
            raise ConfigError(missing_cohort_message(root))
        return cfg
    m = load_manifest(root)
    kind = kind_of(m.config)
    if kind.generated:
        return cfg
    if getattr(m.config, "task", cfg.task) != cfg.task:
        raise ConfigError(
            f"data.cohort={root} is an ingested {m.config.task} cohort; this config trains task {cfg.task}"
        )
    if not m.labelled:
        raise ConfigError(
            f"data.cohort={root} is unlabelled (its ingest spec names no label column): it can be predicted "
            f"on, not trained or evaluated on"
        )
    if to_dict(cfg.cohort) == to_dict(m.config):
        return cfg
    return derive(cfg, {"cohort": to_dict(m.config)}, f"the config with the cohort section of {root / MANIFEST}")


def missing_cohort_message(root: Path) -> str:
    """data.cohort names no cohort: say so, with the closest existing ones and the two ways on."""
    from trd_hpc.data.manifest import nearby_cohorts

    near = nearby_cohorts(root)
    what = "no such directory" if not root.exists() else "no manifest.json there (not a finished cohort)"
    hint = f" (did you mean {' or '.join(str(p) for p in near)}?)" if near else ""
    return (
        f"data.cohort={root}: {what}{hint}; train on an existing cohort (`trd-hpc generate` or `trd-hpc ingest` "
        f"makes one), or pass --generate (data.generate=true) to make a synthetic one there from the config"
    )


def ensure_cohort(cfg: "ExperimentConfig", info: D.DistInfo, progress: bool = True) -> Path:
    """The config's cohort directory; generated first (by rank 0) only when absent and the
    config asks for it (data.generate), so a mistyped path never becomes a synthetic cohort."""
    cfg = resolve_cohort(cfg)  # refuses a missing cohort unless data.generate
    root = Path(cfg.data.cohort)
    if info.is_main and not (root / MANIFEST).exists():
        from trd_hpc.data.kinds import kind_of

        check_target_dir(cfg.cohort, root)  # never generate over another cohort's or tool's files
        what = (
            f"a synthetic cohort ({kind_of(cfg.cohort).generator or cfg.cohort.kind} generator, "
            f"seed {cfg.cohort.seed}, {cfg.cohort.n_subjects} subjects)"
        )
        if cfg.data.source == "virtual":
            from trd_hpc.data.generate import write_virtual

            say(f"data.generate: writing {what} at {root} as a virtual cohort (manifest only)")
            write_virtual(cfg.cohort, root)
        else:
            say(f"data.generate: generating {what} at {root}")
            generate(cfg.cohort, root, progress=progress)
    D.barrier(info)
    m = load_manifest(root)
    have = {k: v for k, v in to_dict(m.config).items() if k != "subjects_per_shard"}
    want = {k: v for k, v in to_dict(cfg.cohort).items() if k != "subjects_per_shard"}
    if have != want:
        diffs = sorted(k for k, v in flatten(want).items() if flatten(have).get(k) != v)
        raise ConfigError(
            f"data.cohort={root} holds a cohort made with another config (differs in: "
            f"{', '.join('cohort.' + k for k in diffs)}); point data.cohort at a new directory"
        )
    return root
