"""Building blocks of the EMT that are faster on CPU than PyTorch's own, same maths.

Speed on CPU (the EMT's encoder and dropout): attention is
``scaled_dot_product_attention`` (the fused flash kernel), and the dropout masks
come from 64-bit random words cut into 16-bit pieces, ~10x cheaper than
``torch.nn.functional.dropout`` on CPU.  No device, precision or distributed
policy lives here.

Measured on a 2-core AMD EPYC (fp32, 2 threads, batch 12, paper sizes, 389
tokens, 4 x 256, 8 heads, ff 512; fp32 matmul ~175 GFLOP/s at the time), forward
+ backward of the encoder alone with dropout 0.1: ``nn.TransformerEncoder``
2.0 s, :class:`Encoder` 0.73 s (0.64 s with dropout 0), 1.65 s with
``attn_dropout=0.1`` as well; a whole EMT AdamW step 1.26 s (9.5 samples/s).
PyTorch's layer is slow in training because its attention-weight dropout
forces the unfused attention and ``F.dropout`` draws one float per element.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- dropout
def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool keep-mask with P(drop) = round(p * 65536) / 65536, and the matching
    1 / P(keep) scale.  One 64-bit random word gives four 16-bit draws, so the
    CPU generator runs a quarter as often as for one float per element."""
    n = math.prod(shape)
    drop = int(round(p * 65536))
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    keep = words.view(torch.int16)[:n] >= (drop - 32768)
    return keep.view(shape), 65536.0 / (65536 - drop)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.masked_fill(~keep, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0).mul_(ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, the same in distribution as ``F.dropout`` (up to p being
    rounded to a multiple of 1/65536).  On CPU the mask is drawn as above and kept
    as one byte per element for the backward; elsewhere ``F.dropout`` (fused on
    GPUs).  Reproducible under ``torch.manual_seed``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, p)


class FastDropout(nn.Module):
    """``nn.Dropout`` drawing its masks with :func:`fast_dropout`."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------- encoder
class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names,
    shapes and initialisation (``in_proj_weight``, ``in_proj_bias``, ``out_proj``),
    computed with ``scaled_dot_product_attention``.

    ``attn_dropout`` drops attention weights in training (as ``nn.MultiheadAttention``'s
    ``dropout``).  It defaults to 0: no fused CPU kernel supports it, and on CPU it
    more than halves the training speed of the EMT encoder (module notes).
    When set, the fused kernel's own ``dropout_p`` is used off-CPU and a
    materialised softmax with :func:`fast_dropout` on CPU.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.attn_dropout = d_model, n_heads, float(attn_dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.n_heads
        q, k, v = (
            F.linear(x, self.in_proj_weight, self.in_proj_bias)
            .view(b, n, 3, h, d // h)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        p = self.attn_dropout if self.training else 0.0
        if p > 0.0 and x.device.type == "cpu":
            w = torch.softmax(torch.matmul(q * (d // h) ** -0.5, k.transpose(-1, -2)), dim=-1)
            a = torch.matmul(fast_dropout(w, p), v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """A Transformer encoder layer computing, in eval mode, the same function as
    ``nn.TransformerEncoderLayer(d_model, n_heads, d_ff, activation="gelu",
    batch_first=True, norm_first=norm_first)`` and loading its state dict as is.

    Training differs in two ways, both for speed: dropout masks come from
    :class:`FastDropout`, and the attention weights are dropped only when
    ``attn_dropout > 0`` (PyTorch's layer drops them with its ``dropout``); the
    three other dropout sites (after attention, inside and after the
    feed-forward block) use ``dropout`` as in PyTorch's layer.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = FastDropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = FastDropout(dropout)
        self.dropout2 = FastDropout(dropout)
        self.norm_first = norm_first

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x)))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        return self.norm2(x + self._ff(x))


class Encoder(nn.Module):
    """``n_layers`` :class:`EncoderLayer` s (keys ``layers.{i}.*`` as in
    ``nn.TransformerEncoder``), no final norm."""

    def __init__(self, n_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
