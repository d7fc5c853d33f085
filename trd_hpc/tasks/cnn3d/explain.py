"""Paper 001's explanation for ``trd-hpc predict --explain``: Grad-CAM
(``monai.visualize.GradCAM``) at the encoder's last block, per head - the predicted class's
logit and the severity output - upsampled to the input grid."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


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
