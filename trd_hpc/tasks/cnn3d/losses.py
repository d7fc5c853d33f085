"""Losses of the dual-path 3-D CNN (paper 001, section 2.4).

total = severity_weight * MSE(severity) + response_weight * categorical focal loss(response)
with the paper's weights 0.4 / 0.6 and focal alpha 0.25, gamma 2.

Why the focal loss is written here rather than taken from ``monai.losses.FocalLoss``:
the paper's "categorical focal cross-entropy" is the Keras one, in which a scalar
alpha multiplies the loss of *every* class the same way, and the per-sample loss is
summed over classes before the batch mean:

    FL_i = -alpha * (1 - p_{i,t})^gamma * log p_{i,t},   loss = mean_i FL_i.

MONAI 1.6's ``FocalLoss(use_softmax=True, to_onehot_y=True, alpha=a)`` differs in
two ways (``softmax_focal_loss`` in monai/losses/focal_loss.py):

* a scalar alpha becomes the class factors ``[1 - a, a, a, ...]``: channel 0 is
  treated as "background" and gets 1 - a (0.75 for a = 0.25), the others a.  For
  our three response classes that up-weights non-responders 3x against the
  others instead of scaling all classes alike (a sequence ``[a, a, a]`` would
  reproduce the Keras factor);
* ``reduction="mean"`` averages over the B x C one-hot entries (C - 1 of them
  zero), so the value is the Keras loss divided by C; and ``reduction="sum"``
  on [B, C] input takes ``mean(dim=[])`` over the (absent) spatial axes, which
  torch reads as "all axes", so it also returns sum / (B x C).
  (Checked on MONAI 1.6.1: for 3 classes, scalar alpha 0.25 and gamma 2, MONAI's
  "mean" with alpha ``[a, a, a]`` is exactly this loss / 3.)

So the formula is written in torch below, from ``log_softmax`` (stable for any
logits: no log(0), no clipping needed).  A per-class alpha sequence is accepted
as well (alpha[target] per sample).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from trd_hpc.tasks.cnn3d.config import MultiTaskLossConfig

TASKS = ("response", "severity")


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | Sequence[float] | torch.Tensor = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Categorical focal loss ``-alpha * (1 - p_t)^gamma * log p_t`` with p = softmax(logits).

    logits [B, C] (any float dtype; computed in float32 at least), target [B]
    integer class indices.  ``alpha``: a scalar applied to every class (Keras'
    ``CategoricalFocalCrossentropy``), or C per-class values.  gamma = 0 and
    alpha = 1 give ``F.cross_entropy``.  reduction: "mean" (over the batch),
    "sum" or "none" ([B]).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be [B] = {tuple(logits.shape[:1])}, got {tuple(target.shape)}")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    t = target.long().unsqueeze(1)
    logp_t = F.log_softmax(x, dim=1).gather(1, t).squeeze(1)  # [B]
    p_t = logp_t.exp()
    # (1 - p_t)^gamma; clamp keeps pow() finite for gamma < 1 when p_t rounds to 1.
    modulating = (1.0 - p_t).clamp_min(0.0).pow(gamma) if gamma != 0 else torch.ones_like(p_t)
    if isinstance(alpha, (int, float)):
        alpha_t: torch.Tensor | float = float(alpha)
    else:
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        if a.ndim == 0:
            alpha_t = a
        else:
            if a.shape != (x.shape[1],):
                raise ValueError(f"alpha must be a scalar or {x.shape[1]} per-class values, got shape {tuple(a.shape)}")
            alpha_t = a[t.squeeze(1)]
    loss = -alpha_t * modulating * logp_t
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class MultiTaskLoss(nn.Module):
    """``severity_weight * MSE(severity) + response_weight * focal(response_logits, response)``.

    ``tasks``: the tasks the model learns (its ``tasks`` attribute).  A task
    not in ``tasks`` gets weight 0: it is not computed, adds nothing to the
    total or the gradients, and its part is reported as 0.

    ``forward(outputs, response, severity)`` with the model's output dict
    (``response_logits`` [B, 3], ``severity`` [B] in [0, 1]) and the targets
    (``response`` [B] int64, ``severity`` [B] float in [0, 1]) returns
    ``(total, {"loss.severity": mse, "loss.response": focal})``: the parts are
    unweighted and detached (for logging); the total carries the gradient.
    Computed in float32 even when the model runs in bf16/fp16.
    """

    def __init__(self, cfg: MultiTaskLossConfig | None = None, tasks: Sequence[str] = TASKS):
        super().__init__()
        cfg = cfg if cfg is not None else MultiTaskLossConfig()
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
        self.tasks = tasks
        self.severity_weight = float(cfg.severity_weight) if "severity" in tasks else 0.0
        self.response_weight = float(cfg.response_weight) if "response" in tasks else 0.0
        self.focal_alpha = float(cfg.focal_alpha)
        self.focal_gamma = float(cfg.focal_gamma)

    def forward(
        self, outputs: dict[str, torch.Tensor], response: torch.Tensor, severity: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = outputs["response_logits"]
        total = logits.new_zeros((), dtype=torch.float32)
        zero = total.detach()
        parts = {"loss.severity": zero, "loss.response": zero}
        if "severity" in self.tasks:
            pred = outputs["severity"].float().reshape(-1)
            mse = F.mse_loss(pred, severity.float().reshape(-1).to(pred.device))
            total = total + self.severity_weight * mse
            parts["loss.severity"] = mse.detach()
        if "response" in self.tasks:
            fl = focal_loss(logits.float(), response.to(logits.device), self.focal_alpha, self.focal_gamma)
            total = total + self.response_weight * fl
            parts["loss.response"] = fl.detach()
        return total, parts
