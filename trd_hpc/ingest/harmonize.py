"""ComBat site harmonisation of ingested volumes (spec key ``harmonize:``), fitted on the
training split only.

Each voxel of the resampled volumes is one feature.  ComBat (Johnson et al. 2007; for
imaging Fortin et al. 2018) models it as ``x = alpha + C beta + gamma_site + delta_site e``
and removes the site's location ``gamma`` and scale ``delta`` with empirical-Bayes estimates,
keeping the covariates' effects ``C beta`` (sex, age, diagnosis).  The fit is neuroCombat's
own (``neuroCombat.neuroCombat``).  Applying the estimates is written here:
``neuroCombatFromTraining`` adds the training subjects' mean covariate effect to every new
subject instead of the subject's own, so a new subject would not be corrected as a training
subject of the same site and covariates was.  ``apply`` uses each subject's own covariate row
with the betas of the same least-squares fit, and a test checks that it reproduces
neuroCombat's output on the training subjects.

Why training subjects only: fitted on all subjects, the validation and test volumes would
shape the estimates every training volume is corrected with, and the scores measured on them
would no longer be held out.  The spec's ``fit_on`` accepts ``train`` alone
(``trd_hpc.cohort_config.Harmonize``), and a site with no training subject is refused: there
are no estimates for it.

The estimates are arrays in ``COHORT/harmonization.npz`` (read with ``allow_pickle=False``;
fingerprinted by content, since a zip's timestamps differ each time it is written); the
resolved config names the file and the fingerprint, each process checks it before use, and a
model's bundle carries a copy so that ``trd-hpc predict --bids`` harmonises new subjects of the
fitted sites with the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from trd_hpc.errors import IngestError

FILE = "harmonization.npz"
SITE = "harmonize.site"  # the keys of the per-subject values read from the table
_CAT, _CONT = "harmonize.categorical.", "harmonize.continuous."
_ARRAYS = (
    "sites",
    "categorical",
    "continuous",
    "voxels",
    "shape",
    "grand_mean",
    "var_pooled",
    "gamma",
    "delta",
    "beta",
)


# ---------------------------------------------------------------- the table's columns
def table_values(spec, df, tpath: Path) -> dict[str, np.ndarray]:
    """Each subject's site and covariates, as the values ``Subjects.values`` carries."""
    from trd_hpc.ingest import table as T

    h = spec.harmonize
    out: dict[str, np.ndarray] = {}
    for name, key, kind in (
        [(h.site_column, SITE, "text")]
        + [(c, _CAT + c, "text") for c in h.categorical]
        + [(c, _CONT + c, "number") for c in h.continuous]
    ):
        col = T.column(df, tpath, name, "harmonize")
        if col.isna().any():
            raise IngestError(
                f"{tpath}: column '{name}' (harmonize) is empty on line(s) {T.lines(col.index[col.isna()])}; "
                "ComBat needs every subject's site and covariates"
            )
        if kind == "number":
            out[key] = T.numbers(df, tpath, name, "harmonize").astype(np.float64)
        else:
            out[key] = np.array([str(v).strip() for v in col], dtype=object)
    return out


def collect_values(spec, m, df, tpath: Path, problems, values: dict) -> None:
    """Add the harmonisation's columns to a subject list's ``values`` (problems recorded)."""
    if m.image_ndim != 3:
        problems.add(
            f"spec key 'harmonize': ComBat corrects features that mean the same in every subject (a voxel of "
            f"a 3-D volume); task {spec.task}'s {m.image_ndim}-D series are standardised per subject instead"
        )
        return
    values.update(problems.attempt(table_values, spec, df, tpath, default={}))


def covariates(spec_or_est, values: dict, rows) -> tuple[dict, dict]:
    cats = {c: values[_CAT + c][rows] for c in _names(spec_or_est, "categorical")}
    conts = {c: values[_CONT + c][rows] for c in _names(spec_or_est, "continuous")}
    return cats, conts


def _names(h, which: str) -> list[str]:
    v = h[which] if isinstance(h, dict) else getattr(h, which)
    return [str(x) for x in v]


# ---------------------------------------------------------------- fit and apply
def _levels(values) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=str))


def _covariate_design(est: dict, cats: dict, conts: dict, n: int) -> np.ndarray:
    """The covariate columns of neuroCombat's design matrix: each categorical one-hot without
    its first level (levels sorted, as np.unique gives them), then each continuous value as
    float32 (the precision neuroCombat's design holds it in)."""
    cols = [np.zeros((n, 0))]
    for k, name in enumerate(_names(est, "categorical")):
        levels = est[f"levels_{k}"]
        v = np.asarray(cats[name], dtype=str)
        idx = np.searchsorted(levels, v)
        unknown = sorted(set(v[(idx >= len(levels)) | (levels[np.minimum(idx, len(levels) - 1)] != v)]))
        if unknown:
            raise IngestError(
                f"harmonize: covariate '{name}' has value(s) {', '.join(unknown)} the estimates were not fitted on "
                f"(they know {', '.join(levels)})"
            )
        cols.append((idx[:, None] == np.arange(1, len(levels))[None, :]).astype(np.float64))
    for name in _names(est, "continuous"):
        cols.append(np.asarray(conts[name], dtype=np.float32).astype(np.float64)[:, None])
    return np.hstack(cols)


def fit(data: np.ndarray, sites, cats: dict, conts: dict) -> dict[str, np.ndarray]:
    """ComBat estimates from ``data`` (subjects x voxels, any shape after the first axis).

    Voxels constant within any site (the background outside the brain) are left as they are:
    ComBat's scale of a site is undefined there."""
    import pandas as pd

    try:
        from neuroCombat import neuroCombat
    except ImportError:
        raise IngestError("harmonize: needs neuroCombat: pip install 'trd-hpc[harmonize]'") from None

    n = data.shape[0]
    x = data.reshape(n, -1).astype(np.float64)
    sites = np.asarray(sites, dtype=str)
    site_levels = _levels(sites)
    varies = np.ones(x.shape[1], dtype=bool)
    for s in site_levels:
        varies &= x[sites == s].var(axis=0) > 0
    voxels = np.flatnonzero(varies)
    if not len(voxels):
        raise IngestError("harmonize: no voxel varies within every site; there is nothing ComBat can estimate")
    covars = pd.DataFrame({"__site__": sites, **{c: np.asarray(v, dtype=str) for c, v in cats.items()}})
    for c, v in conts.items():
        covars[c] = np.asarray(v, dtype=np.float64)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would interleave ours
        res = neuroCombat(
            x[:, voxels].T, covars, "__site__", categorical_cols=list(cats) or None, continuous_cols=list(conts) or None
        )
    e, design = res["estimates"], res["info"]["design"]
    # the betas of the least-squares fit neuroCombat makes per voxel, all voxels at once
    beta = np.linalg.lstsq(design, x[:, voxels], rcond=None)[0][len(site_levels) :]
    est = {
        "sites": site_levels,
        "categorical": np.array(list(cats), dtype=str),
        "continuous": np.array(list(conts), dtype=str),
        "voxels": voxels.astype(np.int64),
        "shape": np.array(data.shape[1:], dtype=np.int64),
        "grand_mean": np.asarray(e["stand.mean"][:, 0], dtype=np.float64),
        "var_pooled": np.asarray(e["var.pooled"][:, 0], dtype=np.float64),
        "gamma": np.asarray(e["gamma.star"], dtype=np.float64),
        "delta": np.asarray(e["delta.star"], dtype=np.float64),
        "beta": beta.astype(np.float64),
        "n_fit": np.array(n, dtype=np.int64),
    }
    est.update({f"levels_{k}": _levels(v) for k, v in enumerate(cats.values())})
    return est


def apply(est: dict, data: np.ndarray, sites, cats: dict, conts: dict) -> np.ndarray:
    """``data`` (subjects x voxels) harmonised with ``est``, in float32."""
    n = data.shape[0]
    x = data.reshape(n, -1).astype(np.float64)
    sites = np.asarray(sites, dtype=str)
    known = est["sites"]
    unknown = sorted(set(sites) - set(known))
    if unknown:
        raise IngestError(
            f"harmonize: site(s) {', '.join(unknown)} are not among the sites the estimates were fitted on "
            f"({', '.join(known)}); ComBat has no location or scale for them"
        )
    b = np.searchsorted(known, sites)
    v = est["voxels"]
    mod = _covariate_design(est, cats, conts, n) @ est["beta"]
    sd = np.sqrt(est["var_pooled"])
    z = (x[:, v] - est["grand_mean"] - mod) / sd
    z = (z - est["gamma"][b]) / np.sqrt(est["delta"][b])
    out = x.copy()
    out[:, v] = z * sd + est["grand_mean"] + mod
    return out.reshape(data.shape).astype(np.float32)


# ---------------------------------------------------------------- the estimates file
def content_sha256(est: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(est):
        a = np.ascontiguousarray(est[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(est: dict, path: Path) -> None:
    from trd_hpc.fsio import atomic_write_with

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the name
            np.savez(f, **est)

    atomic_write_with(path, write)


def read(path: Path) -> dict[str, np.ndarray]:
    """The estimates in ``path``, checked for the arrays and shapes ``apply`` needs (an
    estimates file is handed over like a bundle: nothing in it runs, pickles are refused)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            est = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: not a harmonisation estimates file ({e})") from None
    missing = [k for k in (*_ARRAYS, "n_fit") if k not in est]
    missing += [f"levels_{k}" for k in range(len(est.get("categorical", ()))) if f"levels_{k}" not in est]
    if missing:
        raise IngestError(f"{path}: not a harmonisation estimates file (no {', '.join(missing)})")
    s, f = len(est["sites"]), len(est["voxels"])
    p = len(est["beta"])
    want = {"grand_mean": (f,), "var_pooled": (f,), "gamma": (s, f), "delta": (s, f), "beta": (p, f)}
    bad = [k for k, shp in want.items() if est[k].shape != shp or est[k].dtype.kind != "f"]
    if bad or (est["voxels"] >= int(np.prod(est["shape"]))).any() or (est["var_pooled"] <= 0).any():
        raise IngestError(f"{path}: damaged harmonisation estimates ({', '.join(bad) or 'voxels or variances'})")
    return est


@lru_cache(maxsize=2)
def _estimates(path: str, sha256: str) -> dict:
    est = read(Path(path))
    if content_sha256(est) != sha256:
        raise IngestError(f"{path}: the harmonisation estimates changed since the cohort was resolved; ingest it again")
    return est


def estimates_of(cfg) -> dict:
    rec = cfg.resolved.harmonization
    return _estimates(rec.file, rec.sha256)


def subject(cfg, s, index: int, volume: np.ndarray) -> np.ndarray:
    """Subject ``index``'s volume as its shard stores it: harmonised when the spec asks."""
    if cfg.harmonize is None:
        return volume
    if cfg.resolved.harmonization is None:
        raise IngestError("harmonize: the estimates were not prepared (trd_hpc.ingest.prepare.harmonized)")
    est = estimates_of(cfg)
    cats, conts = covariates(est, s.values, [index])
    return apply(est, volume[None], s.values[SITE][[index]], cats, conts)[0]


# ---------------------------------------------------------------- resolve and record
def training_rows(spec, subj) -> np.ndarray:
    from trd_hpc.ingest.splits import splits_for

    return np.asarray(splits_for(spec, subj.label, subj.site)[0]["train"], dtype=np.int64)


def check(spec, estimates: Path | None, subj, labelled: bool) -> None:
    """What would make the fit or the apply (of the file ``estimates``, the spec's
    ``harmonize.estimates``) fail, found when the spec is resolved (``trd-hpc ingest
    --check`` lists it without reading an image)."""
    h = spec.harmonize
    if h is None:
        return
    sites = np.asarray(subj.values[SITE], dtype=str)
    if h.estimates is not None:
        est = read(estimates)
        for which in ("categorical", "continuous"):
            if _names(est, which) != _names(h, which):
                raise IngestError(
                    f"harmonize.{which}: {_names(h, which)}, but {h.estimates} was fitted with {_names(est, which)}"
                )
        cats, conts = covariates(est, subj.values, slice(None))
        _covariate_design(est, cats, conts, len(sites))
        unknown = sorted(set(sites) - set(est["sites"].tolist()))
        if unknown:
            raise IngestError(
                f"harmonize: site(s) {', '.join(unknown)} are not among those {h.estimates} was fitted on "
                f"({', '.join(est['sites'])}); ComBat has no estimates for them"
            )
        return
    if not labelled:
        raise IngestError(
            "harmonize: ComBat is fitted on the training split and an unlabelled cohort has none; apply fitted "
            "estimates instead: harmonize.estimates: FILE (a model bundle's harmonization.npz)"
        )
    train = training_rows(spec, subj)
    levels, counts = np.unique(sites[train], return_counts=True)
    if len(levels) < 2:
        raise IngestError(f"harmonize: the training split holds one site ({levels[0]}); ComBat needs two or more")
    few = [f"{s} ({c})" for s, c in zip(levels, counts) if c < 2]
    if few:
        raise IngestError(f"harmonize: site(s) with fewer than 2 training subjects: {', '.join(few)}")
    outside = sorted(set(sites) - set(levels.tolist()))
    if outside:
        raise IngestError(
            f"harmonize: site(s) {', '.join(outside)} have no training subject, so ComBat fitted on the training "
            "split has no estimates for them (a split that keeps sites whole - site_column - puts whole sites "
            "in val/test: group the split by another column, or leave harmonize out)"
        )
    cats, conts = covariates(h, subj.values, train)
    est = {"categorical": list(cats), "continuous": list(conts)}
    est.update({f"levels_{k}": _levels(v) for k, v in enumerate(cats.values())})
    all_cats, all_conts = covariates(h, subj.values, slice(None))
    _covariate_design(est, all_cats, all_conts, len(sites))  # a level seen only outside training
    onehot = (np.searchsorted(levels, sites[train])[:, None] == np.arange(len(levels))).astype(np.float64)
    design = np.hstack([onehot, _covariate_design(est, cats, conts, len(train))])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise IngestError(
            "harmonize: in the training split the covariates are confounded with the sites (a covariate "
            "constant within each site, or one fixed by the others), so ComBat cannot tell their effects apart"
        )


def record(cfg) -> dict | None:
    """The manifest's (and the bundle's) account of the harmonisation."""
    if cfg.harmonize is None or cfg.resolved.harmonization is None:
        return None
    r = cfg.resolved.harmonization
    est = estimates_of(cfg)
    return {
        "method": "ComBat (neuroCombat: parametric empirical Bayes), voxel by voxel on the resampled volumes",
        **cfg.harmonize.model_dump(mode="json"),
        "fitted_on": r.fitted_on,
        "sites": r.sites,
        "file": FILE,
        "sha256": r.sha256,
        "voxels_harmonised": int(len(est["voxels"])),
        "voxels": int(np.prod(est["shape"])),
    }
