"""Paper 000's explanation for ``trd-hpc predict --explain``: Captum's Integrated Gradients
of the EMT's logit, per modality, from an all-zero baseline.

For the fMRI and the clinical values that baseline is the cohort's average subject (both are
standardised: z-scored fMRI, clinical values centred on the training mean - synthetic ones
are centred by construction); for the SNPs, Layer Integrated Gradients on the SNP embedding
from genotype 0 (homozygous for the reference allele), summed over the embedding.  IG and
not gradient x input: its attributions add up to the change in logit from the baseline
(completeness), so modalities compare on one scale.  The fMRI map is summed over frames:
one 3-D map per subject over the grid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

IG_STEPS = 32


def emt_attributions(
    model: nn.Module,
    fmri: torch.Tensor,
    snp: torch.Tensor | None,
    clinical: torch.Tensor,
    steps: int = IG_STEPS,
    present: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Integrated Gradients of the EMT's logit: fmri [B,X,Y,Z,T], snp [B,S], clinical [B,C]
    (``present`` [B, 3]: which modalities each subject has, passed through to the model).  snp
    None: a model of a cohort without genotypes (``forward(fmri, clinical[, present])``), whose
    SNP attributions are [B, 0]."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model.eval()
    fmri, clinical = fmri.float(), clinical.float()
    extra = () if present is None else (present,)
    if snp is None:
        ig = IntegratedGradients(lambda f, c, *p: model(f, c, *p))
        a_fmri, a_clin = ig.attribute(
            (fmri, clinical),
            baselines=(torch.zeros_like(fmri), torch.zeros_like(clinical)),
            additional_forward_args=extra or None,
            n_steps=steps,
            internal_batch_size=max(1, fmri.shape[0]) * 4,
        )
        b = fmri.shape[0]
        return {
            "fmri": a_fmri.detach().sum(dim=-1).numpy(),
            "clinical": a_clin.detach().numpy(),
            "snp": np.zeros((b, 0)),
        }
    ig = IntegratedGradients(lambda f, c, s, *p: model(f, s, c, *p))
    a_fmri, a_clin = ig.attribute(
        (fmri, clinical),
        baselines=(torch.zeros_like(fmri), torch.zeros_like(clinical)),
        additional_forward_args=(snp, *extra),
        n_steps=steps,
        internal_batch_size=max(1, fmri.shape[0]) * 4,
    )
    lig = LayerIntegratedGradients(lambda s, f, c, *p: model(f, s, c, *p), model.snp_embed)
    a_snp = lig.attribute(
        snp,
        baselines=torch.zeros_like(snp),
        additional_forward_args=(fmri, clinical, *extra),
        n_steps=steps,
        internal_batch_size=max(1, fmri.shape[0]) * 4,
    )
    return {
        "fmri": a_fmri.detach().sum(dim=-1).numpy(),  # over frames: [B, X, Y, Z] (or [B, R] per region)
        "clinical": a_clin.detach().numpy(),
        "snp": a_snp.detach().sum(dim=-1).numpy(),
    }
