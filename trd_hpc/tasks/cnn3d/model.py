"""Dual-path 3-D CNN (paper 001, section 2.3) and its baselines.

Input: ``volume`` [B, 1, X, Y, Z] float32 in [0, 1] (the loader's normalised
volumes; Z is the thin axis, 16 slices in the paper's 64x64x16 volumes).

Every model's ``forward(volume)`` returns the same dict

* ``response_logits`` [B, 3]: raw scores of the three response classes
  (non-responder, partial, responder); softmax is left to the loss / metrics.
* ``severity`` [B]: predicted severity in [0, 1] (sigmoid).

and carries ``tasks``: the tasks it learns.  A single-task baseline still
returns both keys; for the task it does not learn it returns zeros (uniform
logits / severity 0), which :class:`trd_hpc.tasks.cnn3d.losses.MultiTaskLoss`
leaves out of the total when given the model's ``tasks``.

Models (``CNN3DModelConfig.name``):

* ``dual_path``: :class:`DualPathCNN3D`, shared encoder + severity path +
  response path, each path with its own attention module.
* ``single_task_response`` / ``single_task_severity``:
  :class:`SingleTaskCNN3D`, the same encoder and one path.
* ``resnet18``: :class:`ResNet18TwoHeads`, MONAI's 3-D ResNet-18 trunk with
  the two heads (MONAI is an optional dependency, imported when built).

The model holds no device, precision or distributed code: the trainer moves,
casts, wraps and compiles it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from trd_hpc.tasks.cnn3d.config import CNN3DExperiment, CNN3DModelConfig

N_CLASSES = 3
TASKS = ("response", "severity")

# Pooling rule for the encoder: after each conv block an axis is max-pooled by
# 2 only while its current size is >= _POOL_MIN; otherwise that axis keeps its
# size (kernel 1).  No axis therefore drops below 2 voxels before the global
# average pooling, and the thin z axis simply stops being pooled earlier:
#   paper 64x64x16, channels (16,32,64): kernels (2,2,2)x3 -> 8x8x2
#   tiny  24x24x8,  channels (16,32,64): (2,2,2),(2,2,2),(2,2,1) -> 3x3x2
_POOL_MIN = 4


def pool_kernels(
    in_shape: Sequence[int], n_blocks: int, pooled_blocks: int | None = None
) -> list[tuple[int, int, int]]:
    """The MaxPool3d kernel (= stride) of each encoder block for ``in_shape`` (see ``_POOL_MIN``);
    only the first ``pooled_blocks`` blocks pool (None: all), the others keep their size."""
    size = [int(s) for s in in_shape]
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"in_shape must be 3 positive sizes (X, Y, Z), got {tuple(in_shape)}")
    pooled = n_blocks if pooled_blocks is None else pooled_blocks
    kernels = []
    for b in range(n_blocks):
        k = tuple(2 if s >= _POOL_MIN and b < pooled else 1 for s in size)
        size = [s // kk for s, kk in zip(size, k)]
        kernels.append(k)
    return kernels  # type: ignore[return-value]


def encoder_out_shape(in_shape: Sequence[int], n_blocks: int, pooled_blocks: int | None = None) -> tuple[int, int, int]:
    size = [int(s) for s in in_shape]
    for k in pool_kernels(in_shape, n_blocks, pooled_blocks):
        size = [s // kk for s, kk in zip(size, k)]
    return tuple(size)  # type: ignore[return-value]


class Encoder3D(nn.Module):
    """Shared encoder: per entry of ``channels`` one Conv3d(3x3x3, pad 1) -> BN -> ReLU -> MaxPool3d
    (the pooling only in the first ``pooled_blocks`` blocks; None: every block)."""

    def __init__(
        self,
        channels: Sequence[int],
        in_shape: Sequence[int],
        in_channels: int = 1,
        pooled_blocks: int | None = None,
    ):
        super().__init__()
        if not channels:
            raise ValueError("model.channels must name at least one block")
        blocks = []
        c_in = in_channels
        for c_out, k in zip(channels, pool_kernels(in_shape, len(channels), pooled_blocks)):
            blocks.append(
                nn.Sequential(
                    nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # BN follows: no bias
                    nn.BatchNorm3d(c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool3d(kernel_size=k, stride=k),
                )
            )
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = c_in
        self.out_shape = encoder_out_shape(in_shape, len(channels), pooled_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class SqueezeExcitation3D(nn.Module):
    """Channel attention (Hu et al. 2018): GAP -> Linear(C, max(C/r, 8)) -> ReLU -> Linear -> sigmoid, scales channels."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3, 4))
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))
        return x * w[:, :, None, None, None]


class SpatialGate3D(nn.Module):
    """Spatial attention gate: a 1x1x1 conv -> sigmoid gives one map [B,1,X,Y,Z] that multiplies all channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


def make_attention(kind: str, channels: int) -> nn.Module:
    if kind == "se":
        return SqueezeExcitation3D(channels)
    if kind == "spatial":
        return SpatialGate3D(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.attention must be 'se', 'spatial' or 'none', got {kind!r}")


class TaskPath(nn.Module):
    """One path: attention -> global average pooling -> Dropout -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, channels: int, out_features: int, attention: str, dense: int, dropout: float):
        super().__init__()
        self.attention = make_attention(attention, channels)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(channels, dense),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense, out_features),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.attention(feats)))


def _shape3(in_shape: Iterable[int]) -> tuple[int, int, int]:
    s = tuple(int(v) for v in in_shape)
    if len(s) != 3:
        raise ValueError(f"in_shape must be (X, Y, Z), got {s}")
    return s  # type: ignore[return-value]


class DualPathCNN3D(nn.Module):
    """Shared 3-D encoder, then a severity path (sigmoid) and a response path (3 logits).

    Each path has its own attention module (``model_cfg.attention``) so that it
    can weight the shared features for its own task.
    """

    tasks: tuple[str, ...] = TASKS

    def __init__(self, model_cfg: CNN3DModelConfig, in_shape: tuple[int, int, int]):
        super().__init__()
        self.in_shape = _shape3(in_shape)
        self.encoder = Encoder3D(model_cfg.channels, self.in_shape, pooled_blocks=model_cfg.pooled_blocks)
        c = self.encoder.out_channels
        self.severity_path = TaskPath(c, 1, model_cfg.attention, model_cfg.dense, model_cfg.dropout)
        self.response_path = TaskPath(c, N_CLASSES, model_cfg.attention, model_cfg.dense, model_cfg.dropout)

    def forward(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(volume)
        return {
            "response_logits": self.response_path(feats),
            "severity": torch.sigmoid(self.severity_path(feats)).squeeze(1),
        }


class SingleTaskCNN3D(nn.Module):
    """Baseline: the same encoder and one path; the other task's output is zeros."""

    def __init__(self, model_cfg: CNN3DModelConfig, in_shape: tuple[int, int, int], task: str):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.tasks = (task,)
        self.in_shape = _shape3(in_shape)
        self.encoder = Encoder3D(model_cfg.channels, self.in_shape, pooled_blocks=model_cfg.pooled_blocks)
        out = N_CLASSES if task == "response" else 1
        self.path = TaskPath(self.encoder.out_channels, out, model_cfg.attention, model_cfg.dense, model_cfg.dropout)

    def forward(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.path(self.encoder(volume))
        b = volume.shape[0]
        if self.task == "response":
            return {"response_logits": y, "severity": y.new_zeros(b)}
        return {"response_logits": y.new_zeros(b, N_CLASSES), "severity": torch.sigmoid(y).squeeze(1)}


class ResNet18TwoHeads(nn.Module):
    """Baseline: MONAI's 3-D ResNet-18 trunk (``feed_forward=False``: 512 pooled features) and two heads.

    Chosen first convolution: kernel (7,7,3), stride (2,2,1): the in-plane
    axes are halved as in the 2-D ResNet stem while the thin z axis keeps its
    slices (MONAI's default, 7^3 at stride 1, would run the widest layer at full
    resolution).  With the stem max-pool and the three strided stages a
    64x64x16 volume ends at 2x2x1 and a 24x24x8 one at 1x1x1 before pooling.
    Heads: Dropout -> Linear(512, 3) logits, Dropout -> Linear(512, 1) -> sigmoid.
    """

    tasks: tuple[str, ...] = TASKS

    def __init__(self, model_cfg: CNN3DModelConfig, in_shape: tuple[int, int, int]):
        super().__init__()
        from monai.networks.nets import resnet18  # optional dependency (extra "monai")

        self.in_shape = _shape3(in_shape)
        self.trunk = resnet18(
            spatial_dims=3,
            n_input_channels=1,
            feed_forward=False,
            conv1_t_size=(7, 7, 3),
            conv1_t_stride=(2, 2, 1),
        )
        n_feat = 512  # block_inplanes[-1] * expansion of the basic block
        self.dropout = nn.Dropout(model_cfg.dropout)
        self.response_head = nn.Linear(n_feat, N_CLASSES)
        self.severity_head = nn.Linear(n_feat, 1)

    def forward(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.dropout(self.trunk(volume))
        return {
            "response_logits": self.response_head(f),
            "severity": torch.sigmoid(self.severity_head(f)).squeeze(1),
        }


def build_cnn3d_model(exp: CNN3DExperiment) -> nn.Module:
    """The model named by ``exp.model.name`` for volumes of ``exp.cohort.shape``."""
    name = exp.model.name
    shape = tuple(exp.cohort.shape)
    if name == "dual_path":
        return DualPathCNN3D(exp.model, shape)
    if name == "single_task_response":
        return SingleTaskCNN3D(exp.model, shape, "response")
    if name == "single_task_severity":
        return SingleTaskCNN3D(exp.model, shape, "severity")
    if name == "resnet18":
        return ResNet18TwoHeads(exp.model, shape)
    raise ValueError(f"unknown cnn3d model {name!r}")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def cnn3d_flops_per_sample(model: nn.Module, in_shape: Sequence[int], in_channels: int = 1) -> int:
    """Training FLOPs per sample: 3 x 2 x (multiply-accumulates of every Conv3d and Linear).

    Counted with forward hooks on one dummy forward of a [1, C, X, Y, Z] input
    (in eval mode, no grad; the model's mode is restored).  A Conv3d does
    ``out_elements * in_channels/groups * prod(kernel)`` MACs, a Linear
    ``out_elements * in_features``; 1 MAC = 2 FLOPs, and the backward pass is
    taken as twice the forward (gradients w.r.t. inputs and weights), so one
    training step costs 3x the forward.  BatchNorm, activations, pooling,
    attention products and the optimiser are left out (a few % at most).
    """
    macs = 0

    def conv_hook(m: nn.Conv3d, _inp, out: torch.Tensor) -> None:
        nonlocal macs
        k = 1
        for v in m.kernel_size:
            k *= v
        macs += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters(), None)
    x = torch.zeros(
        1,
        in_channels,
        *(int(s) for s in in_shape),
        device=p.device if p is not None else None,
        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32,
    )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(3 * 2 * macs)
