"""Model-agnostic attribution helpers: gradient x input (Captum) and its aggregation.

Attributions are aggregated the way the EMT paper shows them: per fMRI region
box, per clinical variable and per SNP (from the SNP encoder's attention).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def as_box(region: Any) -> Box:
    """A region as ``((x0, x1), (y0, y1), (z0, z1))``, half-open.  Accepts a box,
    a config ``RegionEffect`` (``.box``) or a mapping with a ``"box"`` key."""
    if hasattr(region, "box"):
        region = region.box
    elif isinstance(region, Mapping):
        region = region["box"]
    box = tuple((int(lo), int(hi)) for lo, hi in region)
    if len(box) != 3:
        raise ValueError(f"a region box needs 3 (start, stop) pairs, got {region!r}")
    return box  # type: ignore[return-value]


def _box_slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in box)  # type: ignore[return-value]


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def grad_x_input(
    model: torch.nn.Module,
    batch_inputs: dict[str, torch.Tensor],
    input_names: Sequence[str],
    output_fn: Callable[[Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``|d f(x)_b / dx * x|`` for each floating-point input in ``input_names`` (Captum's
    ``InputXGradient``, made absolute: the figures rank magnitudes).

    The model is called as ``model(**batch_inputs)`` and must return the logit
    [B] (or use ``output_fn`` to pick it out of a tuple/dict).  Integer inputs
    (SNP genotypes) have no gradient and are left out of the result.  Half
    precision inputs are upcast to float32 so the gradient is not lost to
    rounding.  The model is put in eval mode (dropout off) and its previous
    mode restored; parameter ``.grad`` fields are not touched.
    """
    from captum.attr import InputXGradient

    names = [n for n in input_names if torch.is_floating_point(batch_inputs[n])]
    if not names:
        return {}
    rest = {k: v for k, v in batch_inputs.items() if k not in names}

    def forward(*xs):
        out = model(**dict(zip(names, xs)), **rest)
        return output_fn(out) if output_fn is not None else out

    # Captum wants leaf tensors that require grad (it warns once per input otherwise);
    # half precision is upcast, others copied
    xs = tuple(
        (
            batch_inputs[n].detach().float()
            if batch_inputs[n].dtype in (torch.float16, torch.bfloat16)
            else batch_inputs[n].detach().clone()
        ).requires_grad_(True)
        for n in names
    )
    was_training = model.training
    model.eval()
    try:  # Captum differentiates with torch.autograd.grad: parameter .grad stays as it was
        with torch.enable_grad():
            attr = InputXGradient(forward).attribute(xs)
    finally:
        model.train(was_training)
    return {n: a.detach().abs() for n, a in zip(names, attr)}


def aggregate_fmri_by_named_region(attr_fmri, names: Sequence[str]) -> dict[str, float]:
    """Mean attribution per frame of each region, for region x time fMRI: attribution [B, R, T]."""
    a = _numpy(attr_fmri)
    if a.ndim != 3 or a.shape[1] != len(names):
        raise ValueError(f"region fMRI attribution must be [B, {len(names)}, T], got shape {a.shape}")
    per_region = a.mean(axis=(0, 2))
    return {str(n): float(v) for n, v in zip(names, per_region)}


def aggregate_fmri_by_region(attr_fmri, regions: Mapping[str, Any]) -> dict[str, float]:
    """Mean attribution per voxel-frame inside each region box, and over all
    voxels in no box (``outside_regions``), for an attribution [B, X, Y, Z, T].

    Means (not sums) so that regions of different sizes compare fairly.
    """
    a = _numpy(attr_fmri)
    if a.ndim != 5:
        raise ValueError(f"fMRI attribution must be [B, X, Y, Z, T], got shape {a.shape}")
    # Average over subjects and frames first: boxes are spatial.
    spatial = a.mean(axis=(0, 4))
    inside = np.zeros(spatial.shape, dtype=bool)
    out: dict[str, float] = {}
    for name, region in regions.items():
        sl = _box_slices(as_box(region))
        block = spatial[sl]
        out[name] = float(block.mean()) if block.size else float("nan")
        inside[sl] = True
    rest = spatial[~inside]
    out["outside_regions"] = float(rest.mean()) if rest.size else float("nan")
    return out


def aggregate_clinical(attr, names: Sequence[str]) -> dict[str, float]:
    """Mean attribution per clinical variable over the batch, attr [B, C]."""
    a = _numpy(attr)
    if a.ndim != 2 or a.shape[1] != len(names):
        raise ValueError(f"clinical attribution must be [B, {len(names)}], got shape {a.shape}")
    return {n: float(v) for n, v in zip(names, a.mean(axis=0))}


def snp_importance(attention_weights, n_predictive: int) -> dict[str, float]:
    """Mean attention weight per SNP (``snp_0007``) over the batch, plus
    ``predictive_share``: the fraction of the total weight on the first
    ``n_predictive`` SNPs (the ones the generator makes informative), and
    ``uniform_share``, the share a uniform attention would give them."""
    w = _numpy(attention_weights)
    if w.ndim != 2:
        raise ValueError(f"attention weights must be [B, n_snps], got shape {w.shape}")
    n_snps = w.shape[1]
    if not 0 <= n_predictive <= n_snps:
        raise ValueError(f"n_predictive {n_predictive} outside 0..{n_snps}")
    mean = w.mean(axis=0)
    width = max(4, len(str(n_snps - 1)))
    out = {f"snp_{k:0{width}d}": float(v) for k, v in enumerate(mean)}
    total = float(mean.sum())
    out["predictive_share"] = float(mean[:n_predictive].sum() / total) if total > 0 else float("nan")
    out["uniform_share"] = n_predictive / n_snps if n_snps else float("nan")
    return out


def top_k(importance: Mapping[str, float], k: int, prefix: str = "") -> dict[str, float]:
    """The ``k`` largest entries whose name starts with ``prefix`` (e.g. "snp_",
    which leaves out the ``*_share`` summaries of :func:`snp_importance`)."""
    items = [(n, v) for n, v in importance.items() if n.startswith(prefix)]
    items.sort(key=lambda nv: -nv[1])
    return dict(items[:k])


def permutation_importance_by_group(
    predict_fn: Callable[[dict[str, np.ndarray]], np.ndarray],
    inputs: dict[str, np.ndarray],
    y,
    groups: Mapping[str, Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]],
    metric: Callable | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Drop in ``metric`` (default ROC AUC) when one group of features is permuted.

    ``groups[name](inputs, rng)`` returns a copy of ``inputs`` with that group
    shuffled across subjects (e.g. ``lambda d, r: {**d, "clinical": r.permutation(d["clinical"])}``);
    ``predict_fn(inputs)`` returns scores.  Model-agnostic, so it also serves
    the Random Forest baseline, which has no gradients.
    """
    from sklearn.metrics import roc_auc_score

    metric = metric or roc_auc_score
    base = float(metric(y, predict_fn(inputs)))
    out = {"baseline": base}
    for name, permute in groups.items():
        rng = np.random.default_rng(seed)
        out[name] = base - float(metric(y, predict_fn(permute(inputs, rng))))
    return out
