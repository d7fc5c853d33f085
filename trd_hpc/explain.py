"""Per-subject explanations for ``trd-hpc predict --explain``, written as NIfTI.

* EMT: Captum's Integrated Gradients of the logit, per modality, from an all-zero baseline:
  for the fMRI and the clinical values that is the cohort's average subject (both are
  standardised: z-scored fMRI, clinical values centred on the training mean - synthetic
  ones are centred by construction); for the SNPs, Layer Integrated Gradients on the SNP
  embedding from genotype 0 (homozygous for the reference allele), summed over the
  embedding.  IG and not gradient x input: its attributions add up to the change in logit
  from the baseline (completeness), so modalities compare on one scale.  The fMRI map is
  summed over frames: one 3-D map per subject over the grid.
* 3-D CNN: Grad-CAM (``monai.visualize.GradCAM``) at the encoder's last block, per head:
  the predicted class's logit and the severity output, upsampled to the input grid.

Maps are written as NIfTI with the subject's grid affine (an ingested cohort's ``affine``
dataset: its world space) or the identity (synthetic cohorts), so they open in any
viewer; one summary row per subject names the top regions (the cohort's region boxes:
the designed ones, or the grid's octants for a real cohort), SNPs and clinical variables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

IG_STEPS = 32


def emt_attributions(
    model: nn.Module, fmri: torch.Tensor, snp: torch.Tensor, clinical: torch.Tensor, steps: int = IG_STEPS
) -> dict[str, np.ndarray]:
    """Integrated Gradients of the EMT's logit: fmri [B,X,Y,Z,T], snp [B,S], clinical [B,C]."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model.eval()
    fmri, clinical = fmri.float(), clinical.float()
    ig = IntegratedGradients(lambda f, c, s: model(f, s, c))
    a_fmri, a_clin = ig.attribute(
        (fmri, clinical),
        baselines=(torch.zeros_like(fmri), torch.zeros_like(clinical)),
        additional_forward_args=(snp,),
        n_steps=steps,
        internal_batch_size=max(1, fmri.shape[0]) * 4,
    )
    lig = LayerIntegratedGradients(lambda s, f, c: model(f, s, c), model.snp_embed)
    a_snp = lig.attribute(
        snp,
        baselines=torch.zeros_like(snp),
        additional_forward_args=(fmri, clinical),
        n_steps=steps,
        internal_batch_size=max(1, fmri.shape[0]) * 4,
    )
    return {
        "fmri": a_fmri.detach().sum(dim=4).numpy(),  # over frames: [B, X, Y, Z]
        "clinical": a_clin.detach().numpy(),
        "snp": a_snp.detach().sum(dim=-1).numpy(),
    }


class _Head(nn.Module):
    """One output of the CNN as [B, K], what Grad-CAM takes."""

    def __init__(self, m: nn.Module, key: str):
        super().__init__()
        self.m, self.key = m, key

    def forward(self, x):
        y = self.m(x)[self.key]
        return y if y.dim() == 2 else y.unsqueeze(1)


def cnn_maps(model: nn.Module, volume: torch.Tensor, heads: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Grad-CAM per head at the encoder's last block: {head: [B, X, Y, Z]}."""
    try:
        from monai.visualize import GradCAM
    except ImportError:
        from trd_hpc.errors import ConfigError

        raise ConfigError("--explain for the 3-D CNN uses MONAI's Grad-CAM: pip install 'trd-hpc[monai]'") from None

    # the encoder's last block (the dual-path and single-task CNNs), else the last Conv3d (ResNet-18)
    layer = [n for n, _ in model.named_modules() if n.startswith("encoder.blocks.") and n.count(".") == 2][-1:]
    if not layer:
        layer = [n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)][-1:]
    out = {}
    for head in heads:
        wrapped = _Head(model, "response_logits" if head == "response" else "severity").eval()
        cam = GradCAM(nn_module=wrapped, target_layers="m." + layer[0])
        v = volume.float().clone().requires_grad_(True)
        idx = None if head == "response" else 0
        out[head] = cam(v, class_idx=idx).detach()[:, 0].numpy()
    return out


def _top(names: list[str], scores: np.ndarray, k: int = 3) -> str:
    order = np.argsort(-np.abs(scores), kind="stable")[:k]
    return ";".join(f"{names[i]}:{scores[i]:+.3g}" for i in order)


def region_scores(vol: np.ndarray, boxes: dict) -> dict[str, float]:
    """Mean |attribution| inside each region box."""
    return {n: float(np.abs(vol[x0:x1, y0:y1, z0:z1]).mean()) for n, ((x0, x1), (y0, y1), (z0, z1)) in boxes.items()}


def write_map(path: Path, vol: np.ndarray, affine: np.ndarray | None) -> None:
    import nibabel as nib

    from trd_hpc.fsio import atomic_path

    with atomic_path(path) as tmp:
        nib.save(
            nib.Nifti1Image(np.asarray(vol, dtype=np.float32), np.eye(4) if affine is None else affine),
            str(tmp) + ".nii.gz",
        )
        Path(str(tmp) + ".nii.gz").rename(tmp)
