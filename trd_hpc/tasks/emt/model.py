"""Enhanced Multimodal Transformer (EMT, paper 000 section 2.2).

Inputs of one subject: a 4-D fMRI ``[X, Y, Z, T]``, ``n_snps`` genotypes in
{0, 1, 2} and ``n_clinical`` clinical values.  Output: one logit (P(TRD) is its
sigmoid; training uses BCE-with-logits).

* fMRI: non-overlapping spatial patches of ``patch`` voxels keeping all T
  frames (paper: 8*8*6 = 384 tokens of 6*6*4*80 = 11520 values), each
  Linear -> LayerNorm -> GELU -> Dropout(dropout), plus a learnable positional
  embedding ``(N_patches, d_model)``.  Region x time fMRI ``[R, T]`` (an atlas's
  region series) has one token per region and run of ``time_patch`` frames
  (region tokens; the whole series when ``time_patch`` is None), embedded the same way.
* SNPs: Embedding(3, snp_embed_dim); a scalar attention score per SNP,
  softmax over SNPs; weighted embeddings flattened and Linear -> d_model.
* clinical: Linear -> LayerNorm -> GELU -> Dropout(dropout).
* One learnable modality token before each modality; the sequence
  ``[tok_fmri, patches..., tok_snp, snp_vec, tok_clin, clin_vec]`` goes through
  ``n_layers`` post-norm Transformer encoder layers (GELU,
  dropout = ``encoder_dropout``); the head reads the first token:
  Linear -> LayerNorm -> GELU -> Dropout -> Linear(head_hidden, 1).

The Transformer encoder layers and the dropout come from :mod:`trd_hpc.models.layers`:
PyTorch's maths (post-norm layers, inverted dropout) in kernels that are faster on CPU.
No device, precision or distributed policy lives here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trd_hpc.models.layers import Encoder, FastDropout
from trd_hpc.tasks.emt.config import EMTExperiment, EMTModelConfig

Box = Sequence[Sequence[int]]  # ((x0, x1), (y0, y1), (z0, z1)), half-open


# --------------------------------------------------------------------------- patches
def patch_grid(fmri_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """Patches per spatial axis; ValueError when an axis is not a multiple of the patch."""
    spatial = tuple(int(s) for s in fmri_shape[:3])
    if len(spatial) != 3 or len(patch) != 3:
        raise ValueError(f"need a spatial shape and a patch of 3 axes each, got {tuple(fmri_shape)} and {tuple(patch)}")
    bad = [f"axis {a}: {s} % {p} = {s % p}" for a, (s, p) in enumerate(zip(spatial, patch)) if p < 1 or s % p]
    if bad:
        raise ValueError(
            f"fMRI spatial shape {spatial} is not divisible by the patch {tuple(patch)} ({'; '.join(bad)}); "
            f"change model.patch or cohort.fmri.shape"
        )
    return spatial[0] // patch[0], spatial[1] // patch[1], spatial[2] // patch[2]


def patchify(fmri: torch.Tensor, patch: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, X, Y, Z, T]`` -> ``[B, N, px*py*pz*T]`` in one copy (which also casts to
    ``dtype``).  Token ``(i*ny + j)*nz + k`` holds the voxels
    ``[i*px:(i+1)*px, j*py:(j+1)*py, k*pz:(k+1)*pz]``; inside a token the values are
    ordered (dx, dy, dz, t), t fastest."""
    if fmri.dim() != 5:
        raise ValueError(f"fmri must be [B, X, Y, Z, T], got shape {tuple(fmri.shape)}")
    b, _, _, _, t = fmri.shape
    nx, ny, nz = patch_grid(fmri.shape[1:4], patch)
    px, py, pz = patch
    v = fmri.view(b, nx, px, ny, py, nz, pz, t).permute(0, 1, 3, 5, 2, 4, 6, 7)
    out = torch.empty((b, nx, ny, nz, px, py, pz, t), dtype=dtype or fmri.dtype, device=fmri.device)
    return out.copy_(v).view(b, nx * ny * nz, px * py * pz * t)


def region_tokens(fmri: torch.Tensor, time_patch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, R, T]`` -> ``[B, R * (T / time_patch), time_patch]``: region r's k-th run of frames
    is token ``r * (T / time_patch) + k``."""
    if fmri.dim() != 3:
        raise ValueError(f"region fmri must be [B, R, T], got shape {tuple(fmri.shape)}")
    b, r, t = fmri.shape
    if t % time_patch:
        raise ValueError(f"time_patch {time_patch} does not divide the {t} frames")
    return fmri.reshape(b, r * (t // time_patch), time_patch).to(dtype or fmri.dtype)


def token_layout(fmri_shape: Sequence[int], model_cfg: EMTModelConfig) -> tuple[int, int]:
    """(number of fMRI tokens, values per token) of either input form."""
    if len(fmri_shape) == 2:
        r, t = (int(v) for v in fmri_shape)
        tp = model_cfg.time_patch or t
        if t % tp:
            raise ValueError(f"model.time_patch {tp} does not divide the {t} frames of the region series")
        return r * (t // tp), tp
    if len(fmri_shape) != 4:
        raise ValueError(f"fmri_shape must be (X, Y, Z, T) or (regions, T), got {tuple(fmri_shape)}")
    return math.prod(patch_grid(fmri_shape, model_cfg.patch)), math.prod(model_cfg.patch) * int(fmri_shape[3])


def patch_index_of_box(fmri_shape: Sequence[int], patch: Sequence[int], box: Box) -> list[int]:
    """Indices (into the fMRI patch tokens, 0..N_patches-1, the order of
    :func:`patchify`) of the patches that overlap the half-open voxel box
    ``((x0, x1), (y0, y1), (z0, z1))``.  In the EMT's sequence patch ``i`` sits at
    position ``i + 1`` (after the fMRI modality token)."""
    grid = patch_grid(fmri_shape, patch)
    ranges = []
    for axis, ((lo, hi), p, size) in enumerate(zip(box, patch, fmri_shape[:3])):
        if not 0 <= lo < hi <= size:
            raise ValueError(f"box axis {axis} = [{lo}, {hi}) is empty or outside 0..{size}")
        ranges.append(range(lo // p, (hi - 1) // p + 1))
    nx, ny, nz = grid
    return sorted((i * ny + j) * nz + k for i in ranges[0] for j in ranges[1] for k in ranges[2])


# --------------------------------------------------------------------------- model
class EMT(nn.Module):
    """The EMT; ``forward(fmri [B,X,Y,Z,T], snp [B,n_snps] in {0,1,2},
    clinical [B,n_clinical]) -> logit [B]``.

    SNP attention (chosen; the paper says only "an attention mechanism computed
    scalar weights for each SNP embedding"): the score of SNP j of a subject with
    genotype g is ``w . E[g] + b_j`` (a Linear(snp_embed_dim, 1) on the embedding
    plus a learnable per-SNP score ``b_j``, initialised at 0), so it depends on
    both the genotype and the SNP's identity; the weights are the softmax over
    SNPs (:meth:`snp_attention`).  The weighted embeddings are multiplied by
    ``n_snps`` before the projection, so that uniform attention passes the
    embeddings at their own scale (a fixed rescaling of the projection's input,
    the same family of functions; without it the projection sees inputs ~1/800
    of the embedding scale).

    ``attn_dropout`` (keyword, default 0; no config field) drops attention
    weights inside the encoder in training, see :class:`SelfAttention`.
    """

    def __init__(
        self,
        model_cfg: EMTModelConfig,
        fmri_shape: Sequence[int],
        n_snps: int,
        n_clinical: int,
        *,
        genotype_values: int = 3,
        attn_dropout: float = 0.0,
        missing_tokens: bool = False,
    ):
        super().__init__()
        c = model_cfg
        self.cfg = c
        self.fmri_shape = tuple(int(s) for s in fmri_shape)
        self.regions = len(self.fmri_shape) == 2  # region x time (an atlas) instead of voxels
        self.patch = tuple(int(p) for p in c.patch)
        self.time_patch = (c.time_patch or self.fmri_shape[1]) if self.regions else None
        self.grid = None if self.regions else patch_grid(self.fmri_shape, self.patch)
        self.n_patches, self.patch_dim = token_layout(self.fmri_shape, c)
        self.n_snps, self.n_clinical = int(n_snps), int(n_clinical)
        d = c.d_model

        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.patch_norm = nn.LayerNorm(d)
        self.patch_drop = FastDropout(c.dropout)
        self.pos_embed = nn.Parameter(torch.zeros(self.n_patches, d))

        # 0/1/2 copies of an allele; an ingested cohort adds 3, a missing call, learned like the others.
        # A cohort without genotypes (n_snps 0) has no SNP branch and no SNP tokens at all, rather
        # than the missing token for everyone: that token would be one constant carrying nothing,
        # "absent" would no longer single out some subjects against others, and the model, its
        # bundle and its exports would still take an empty genotype input (WithoutGenotypes).
        self.genotyped = self.n_snps > 0
        if self.genotyped:
            self.snp_embed = nn.Embedding(int(genotype_values), c.snp_embed_dim)
            self.snp_score = nn.Linear(c.snp_embed_dim, 1, bias=False)  # a bias would cancel in the softmax
            self.snp_bias = nn.Parameter(torch.zeros(self.n_snps))
            self.snp_proj = nn.Linear(self.n_snps * c.snp_embed_dim, d)

        self.clin_proj = nn.Linear(self.n_clinical, d)
        self.clin_norm = nn.LayerNorm(d)
        self.clin_drop = FastDropout(c.dropout)

        self.tok_fmri = nn.Parameter(torch.zeros(1, 1, d))
        if self.genotyped:
            self.tok_snp = nn.Parameter(torch.zeros(1, 1, d))
        self.tok_clin = nn.Parameter(torch.zeros(1, 1, d))

        self.encoder = Encoder(
            c.n_layers,
            d_model=d,
            n_heads=c.n_heads,
            d_ff=c.d_ff,
            dropout=c.encoder_dropout,
            attn_dropout=attn_dropout,
            norm_first=False,
        )
        self.head = nn.Sequential(
            nn.Linear(d, c.head_hidden),
            nn.LayerNorm(c.head_hidden),
            nn.GELU(),
            FastDropout(c.dropout),
            nn.Linear(c.head_hidden, 1),
        )
        # A subject without a modality (a cohort ingested with on_missing: keep): that modality's
        # tokens are replaced by one learned embedding per modality (fMRI, SNPs, clinical), the
        # sequence keeping its length, so the fusion learns what "absent" means.
        self.missing = nn.Parameter(torch.zeros(3, d)) if missing_tokens else None
        for p in (self.pos_embed, self.tok_fmri, *([self.tok_snp] if self.genotyped else []), self.tok_clin):
            nn.init.trunc_normal_(p, std=0.02)
        if self.missing is not None:
            nn.init.trunc_normal_(self.missing, std=0.02)

    @classmethod
    def from_config(cls, exp: EMTExperiment) -> "EMT":
        co = exp.cohort
        return cls(
            exp.model,
            co.fmri_shape,
            co.n_snps,
            len(co.clinical_names),
            genotype_values=co.genotype_values,
            missing_tokens=getattr(co, "modality_mask", False),
        )

    @property
    def seq_len(self) -> int:
        return self.n_patches + (5 if self.genotyped else 3)

    # -- encoders
    def _check(self, fmri: torch.Tensor, snp: torch.Tensor | None, clinical: torch.Tensor) -> None:
        if tuple(fmri.shape[1:]) != self.fmri_shape:
            raise ValueError(f"fmri must be [B, {', '.join(map(str, self.fmri_shape))}], got {tuple(fmri.shape)}")
        if (snp is None) == self.genotyped:
            raise ValueError(
                f"snp must be {'[B, ' + str(self.n_snps) + ']' if self.genotyped else 'None'} for this model"
            )
        if snp is not None and (snp.dim() != 2 or snp.shape[1] != self.n_snps):
            raise ValueError(f"snp must be [B, {self.n_snps}], got {tuple(snp.shape)}")
        if clinical.dim() != 2 or clinical.shape[1] != self.n_clinical:
            raise ValueError(f"clinical must be [B, {self.n_clinical}], got {tuple(clinical.shape)}")

    def _snp_scores(self, emb: torch.Tensor) -> torch.Tensor:
        return self.snp_score(emb).squeeze(-1) + self.snp_bias

    def snp_attention(self, snp: torch.Tensor) -> torch.Tensor:
        """The softmax attention weights over SNPs, ``[B, n_snps]`` (rows sum to 1)."""
        return torch.softmax(self._snp_scores(self.snp_embed(snp.long())), dim=-1)

    def encode_fmri(self, fmri: torch.Tensor) -> torch.Tensor:
        dt = self.patch_embed.weight.dtype
        x = region_tokens(fmri, self.time_patch, dt) if self.regions else patchify(fmri, self.patch, dtype=dt)
        x = self.patch_drop(F.gelu(self.patch_norm(self.patch_embed(x))))
        return x + self.pos_embed

    def encode_snp(self, snp: torch.Tensor) -> torch.Tensor:
        emb = self.snp_embed(snp.long())  # [B, S, E]
        w = torch.softmax(self._snp_scores(emb), dim=-1)
        return self.snp_proj((emb * (w * self.n_snps).unsqueeze(-1)).flatten(1))

    def encode_clinical(self, clinical: torch.Tensor) -> torch.Tensor:
        x = clinical.to(self.clin_proj.weight.dtype)
        return self.clin_drop(F.gelu(self.clin_norm(self.clin_proj(x))))

    def tokens(
        self, fmri: torch.Tensor, snp: torch.Tensor | None, clinical: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder's input sequence ``[B, N_patches + 5, d_model]`` (``+ 3`` and ``snp`` None
        without genotypes); ``present`` [B, 3] (fMRI, SNPs, clinical; 0 = absent) swaps an absent
        modality's tokens for its learned one."""
        self._check(fmri, snp, clinical)
        patches = self.encode_fmri(fmri)
        b, dt = patches.shape[0], patches.dtype
        snp_vec = self.encode_snp(snp).unsqueeze(1) if self.genotyped else None
        clin_vec = self.encode_clinical(clinical).unsqueeze(1)
        if present is not None and self.missing is not None:
            has = present.to(torch.bool)
            miss = self.missing.to(dt)
            patches = torch.where(has[:, 0, None, None], patches, miss[0])
            if snp_vec is not None:
                snp_vec = torch.where(has[:, 1, None, None], snp_vec.to(dt), miss[1])
            clin_vec = torch.where(has[:, 2, None, None], clin_vec.to(dt), miss[2])
        snp_part = [self.tok_snp.expand(b, -1, -1), snp_vec] if snp_vec is not None else []
        parts = [self.tok_fmri.expand(b, -1, -1), patches, *snp_part, self.tok_clin.expand(b, -1, -1), clin_vec]
        return torch.cat([t.to(dt) for t in parts], dim=1)

    def forward(
        self, fmri: torch.Tensor, snp: torch.Tensor | None, clinical: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.encoder(self.tokens(fmri, snp, clinical, present))
        return self.head(h[:, 0]).squeeze(-1)


class WithoutGenotypes(nn.Module):
    """A network of a cohort without genotypes (built with ``n_snps`` 0: no SNP branch), called
    without them: ``forward(fmri, clinical[, present])``, the inputs such a cohort's batches, the
    bundle's schema and the exported models hold (by name and, for the exports, in that order)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, fmri: torch.Tensor, clinical: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(fmri, None, clinical, present)


# --------------------------------------------------------------------------- FLOPs
def emt_flops_per_sample(model_cfg: EMTModelConfig, fmri_shape: Sequence[int], n_snps: int, n_clinical: int) -> int:
    """Training FLOPs per sample of the EMT: 3 x the forward matmul FLOPs
    (backward ~ 2 x forward), counting 2 FLOPs per multiply-add.

    With d = d_model, E = snp_embed_dim, F = d_ff, H = head_hidden,
    N = number of patches, P = voxels per patch * T, S = n_snps, C = n_clinical and
    L = N + 5 tokens (N + 3 without genotypes), the forward is

    * patch embedding        2 N P d
    * SNP scores + projection 2 S E + 2 (S E) d  (scores: Linear(E, 1), no bias)
    * clinical projection    2 C d
    * per encoder layer      2 L d (3d)  (QKV)  + 2 L d d  (output projection)
                             + 2 L^2 d  (Q K^T) + 2 L^2 d  (attention x V)
                             + 2 L d F + 2 L F d  (feed-forward)
      i.e. 8 L d^2 + 4 L^2 d + 4 L d F, times n_layers
    * head                   2 d H + 2 H

    Norms, activations, softmax, dropout and embedding look-ups are not counted.
    (The fMRI input needs no gradient, so the patch embedding's true backward is
    1x, not 2x, its forward; the x3 convention overcounts it.)
    """
    c = model_cfg
    n, p = token_layout(fmri_shape, c)
    d, e, f, h = c.d_model, c.snp_embed_dim, c.d_ff, c.head_hidden
    seq = n + (5 if n_snps else 3)  # no SNP tokens without genotypes
    fwd = (
        2 * n * p * d
        + 2 * n_snps * e
        + 2 * n_snps * e * d
        + 2 * n_clinical * d
        + c.n_layers * (8 * seq * d * d + 4 * seq * seq * d + 4 * seq * d * f)
        + 2 * d * h
        + 2 * h
    )
    return int(3 * fwd)
