"""What ``trd-hpc ingest`` does to a resolved cohort before its first shard is written: the
steps fitted on the training subjects' images (today ComBat's site estimates,
trd_hpc.ingest.harmonize), whose result the resolved config must name so that every process
writing a shard applies the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trd_hpc.errors import IngestError
from trd_hpc.ingest import harmonize as H


def harmonized(cfg, out: Path, progress: bool = True, force: bool = False):
    """``cfg`` with the estimates its shards are written with, in ``out/harmonization.npz``:
    fitted on the training split's volumes (one pass over them), or the spec's
    ``harmonize.estimates`` copied in.  The same cfg when the spec does not harmonise."""
    from trd_hpc.data.target_dir import check_target_dir
    from trd_hpc.ingest.resolve import _cache_put, image_reader, inside, subjects

    h = cfg.harmonize
    if h is None:
        return cfg
    s = subjects(cfg)
    if h.estimates is not None:
        src = inside(Path(cfg.resolved.root), h.estimates, "harmonize.estimates")
        est = H.read(src)
        fitted = f"{src.name}: estimates fitted elsewhere on {int(est['n_fit'])} training subjects"
    else:
        from tqdm import tqdm

        train = H.training_rows(cfg, s)
        reader = image_reader(cfg)
        vols = np.empty((len(train), *cfg.grid), dtype=np.float32)
        for j, i in enumerate(tqdm(train, desc="harmonize: fit", unit="subject", disable=not progress)):
            vols[j] = reader.to_grid(s.image[i], s.participant_id[i], cfg.grid)[0]
        cats, conts = H.covariates(h, s.values, train)
        est = H.fit(vols, s.values[H.SITE][train], cats, conts)
        fitted = f"train: {len(train)} subjects"
    if tuple(int(v) for v in est["shape"]) != tuple(cfg.grid):
        raise IngestError(f"harmonize: the estimates are for volumes of {tuple(est['shape'])}, the grid is {cfg.grid}")
    from trd_hpc.cohort_config import HarmonizationFile

    rec = HarmonizationFile(
        file=str(Path(out).resolve() / H.FILE), sha256=H.content_sha256(est), fitted_on=fitted, sites=list(est["sites"])
    )
    new = cfg.model_copy(update={"resolved": cfg.resolved.model_copy(update={"harmonization": rec})})
    check_target_dir(new, out, force=force)  # nothing written into someone else's folder
    Path(out).mkdir(parents=True, exist_ok=True)
    H.save(est, Path(out) / H.FILE)
    _cache_put(new, s)
    return new
