"""EMT model, its encoder layer, the late-fusion MLP and the random-forest features.

Small shapes throughout; the paper-size model runs one batch-1 forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trd_hpc.models.layers import Encoder, EncoderLayer, fast_dropout
from trd_hpc.tasks.emt.baselines import (
    LateFusionMLP,
    build_emt_model,
    emt_summary_features,
    fit_random_forest,
)
from trd_hpc.tasks.emt.cohort import make_emt_subject
from trd_hpc.tasks.emt.config import EMTModelConfig
from trd_hpc.tasks.emt.model import EMT, emt_flops_per_sample, patch_index_of_box, patchify

SMALL = dict(d_model=32, n_heads=4, d_ff=64, snp_embed_dim=8, head_hidden=16, n_layers=2, mlp_hidden=16)


def _small(exp, **kw):
    """The tiny experiment with a narrow model (fast tests)."""
    return exp.model_copy(update={"model": exp.model.model_copy(update={**SMALL, **kw})})


def _batch(exp, b=4, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    co = exp.cohort
    fmri = torch.randn((b, *co.fmri.shape), generator=g).to(dtype)
    snp = torch.randint(0, 3, (b, co.snp.n_snps), generator=g, dtype=torch.uint8)
    snp[0, :3] = torch.tensor([0, 1, 2], dtype=torch.uint8)  # every genotype present
    clinical = torch.randn((b, len(co.clinical.names)), generator=g)
    return fmri, snp, clinical


# --------------------------------------------------------------------------- shapes
def test_tiny_forward_shapes(emt_tiny):
    torch.manual_seed(0)
    model = EMT.from_config(emt_tiny).eval()
    assert model.n_patches == 8 and model.patch_dim == 6 * 6 * 4 * 10 and model.seq_len == 13
    fmri, snp, clinical = _batch(emt_tiny, b=3)
    assert model.tokens(fmri, snp, clinical).shape == (3, 13, emt_tiny.model.d_model)
    with torch.no_grad():
        out16 = model(fmri, snp, clinical)
        out32 = model(fmri.float(), snp.long(), clinical)
    assert out16.shape == (3,) and out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32)


def test_paper_token_count_and_forward():
    x = torch.zeros(1, 48, 48, 24, 80, dtype=torch.float16)
    assert patchify(x, (6, 6, 4)).shape == (1, 384, 11520)
    torch.manual_seed(0)
    model = EMT(EMTModelConfig(), (48, 48, 24, 80), 800, 15).eval()
    assert model.n_patches == 384 and model.patch_dim == 11520 and model.seq_len == 389
    with torch.no_grad():
        out = model(x, torch.zeros(1, 800, dtype=torch.uint8), torch.zeros(1, 15))
    assert out.shape == (1,) and torch.isfinite(out).all()


def test_patchify_places_every_voxel():
    b, X, Y, Z, T = 2, 12, 12, 8, 10
    px, py, pz = 6, 6, 4
    fmri = torch.arange(b * X * Y * Z * T, dtype=torch.float64).reshape(b, X, Y, Z, T)
    tok = patchify(fmri, (px, py, pz), dtype=torch.float64)
    assert tok.shape == (b, 8, px * py * pz * T)
    ny, nz = Y // py, Z // pz
    bb, x, y, z, t = np.meshgrid(*map(np.arange, (b, X, Y, Z, T)), indexing="ij")
    token = ((x // px) * ny + y // py) * nz + z // pz
    offset = (((x % px) * py + y % py) * pz + z % pz) * T + t
    np.testing.assert_array_equal(tok.numpy()[bb, token, offset], fmri.numpy())
    # dtype cast happens in the same copy
    assert patchify(fmri.half(), (px, py, pz), dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(
    "shape,box",
    [
        ((12, 12, 8, 10), ((7, 10), (5, 8), (1, 3))),
        ((12, 12, 8, 10), ((0, 1), (0, 1), (0, 1))),
        ((12, 12, 8, 10), ((0, 12), (0, 12), (0, 8))),
        ((48, 48, 24, 80), ((30, 36), (22, 28), (6, 10))),
        ((48, 48, 24, 80), ((8, 16), (36, 44), (14, 20))),
    ],
)
def test_patch_index_of_box_matches_patchify(shape, box):
    mask = torch.zeros(1, *shape[:3], 1)
    (x0, x1), (y0, y1), (z0, z1) = box
    mask[0, x0:x1, y0:y1, z0:z1] = 1
    expect = torch.nonzero(patchify(mask, (6, 6, 4)).sum(-1)[0]).flatten().tolist()
    assert patch_index_of_box(shape, (6, 6, 4), box) == expect


def test_non_divisible_shape_raises(emt_tiny):
    with pytest.raises(ValueError, match="not divisible by the patch"):
        EMT(emt_tiny.model, (13, 12, 8, 10), 100, 15)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        patchify(torch.zeros(1, 12, 12, 6, 10), (6, 6, 4))
    with pytest.raises(ValueError, match="not divisible by the patch"):
        emt_flops_per_sample(emt_tiny.model, (12, 10, 8, 10), 100, 15)
    model = EMT.from_config(_small(emt_tiny))
    with pytest.raises(ValueError, match="fmri must be"):
        model(torch.zeros(1, 12, 12, 4, 10), torch.zeros(1, 100), torch.zeros(1, 15))


# --------------------------------------------------------------------------- SNP attention
def test_snp_attention_is_a_distribution(emt_tiny):
    torch.manual_seed(0)
    model = EMT.from_config(_small(emt_tiny))
    nn.init.normal_(model.snp_bias, std=1.0)  # make the weights non-uniform
    _, snp, _ = _batch(emt_tiny, b=5)
    w = model.snp_attention(snp)
    assert w.shape == (5, 100) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    assert w.std() > 0


# --------------------------------------------------------------------------- encoder layer
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_equals_pytorch_in_eval(norm_first):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, 64, 0.1, activation="gelu", batch_first=True, norm_first=norm_first)
    mine = EncoderLayer(32, 4, 64, dropout=0.1, norm_first=norm_first)
    mine.load_state_dict(ref.state_dict())  # same keys and shapes
    for p in ref.parameters():  # non-trivial norms and biases too
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    mine.load_state_dict(ref.state_dict())
    ref.eval(), mine.eval()
    x = torch.randn(3, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)
    # training with all dropout off: the same function, gradients included
    ref0 = nn.TransformerEncoderLayer(32, 4, 64, 0.0, activation="gelu", batch_first=True, norm_first=norm_first)
    ref0.load_state_dict(ref.state_dict())
    mine0 = EncoderLayer(32, 4, 64, dropout=0.0, norm_first=norm_first)
    mine0.load_state_dict(ref.state_dict())
    ref0.train(), mine0.train()
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref0(xr).square().sum().backward()
    mine0(xm).square().sum().backward()
    torch.testing.assert_close(xm.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for (name, pm), (_, pr) in zip(mine0.named_parameters(), ref0.named_parameters()):
        torch.testing.assert_close(pm.grad, pr.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_encoder_stack_equals_pytorch_in_eval():
    torch.manual_seed(1)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, 0.1, activation="gelu", batch_first=True), 3, enable_nested_tensor=False
    ).eval()
    mine = Encoder(3, d_model=32, n_heads=4, d_ff=64, dropout=0.1).eval()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)


def test_attention_weight_dropout_option():
    torch.manual_seed(2)
    layer = EncoderLayer(32, 4, 64, dropout=0.0, attn_dropout=0.5)
    x = torch.randn(2, 9, 32)
    layer.eval()
    with torch.no_grad():
        a, b = layer(x), layer(x)
    torch.testing.assert_close(a, b)
    layer.train()
    with torch.no_grad():
        assert not torch.allclose(layer(x), layer(x))


# --------------------------------------------------------------------------- training behaviour
def test_gradients_reach_every_parameter(emt_tiny):
    torch.manual_seed(0)
    model = EMT.from_config(_small(emt_tiny)).train()
    fmri, snp, clinical = _batch(emt_tiny, b=4)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    F.binary_cross_entropy_with_logits(model(fmri, snp, clinical), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_only_in_training(emt_tiny):
    torch.manual_seed(0)
    model = EMT.from_config(_small(emt_tiny))
    fmri, snp, clinical = _batch(emt_tiny, b=2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fmri, snp, clinical), model(fmri, snp, clinical), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(fmri, snp, clinical), model(fmri, snp, clinical))


def test_fast_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(200_001, requires_grad=True)
    y = fast_dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 65536 / (65536 - 6554)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    assert fast_dropout(x, 0.1, training=False) is x
    # reproducible under the global seed
    torch.manual_seed(3)
    a = fast_dropout(torch.ones(1000), 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, fast_dropout(torch.ones(1000), 0.3))


# --------------------------------------------------------------------------- late fusion
def test_late_fusion_mlp(emt_tiny):
    torch.manual_seed(0)
    exp = _small(emt_tiny, name="late_fusion_mlp")
    model = build_emt_model(exp)
    assert isinstance(model, LateFusionMLP)
    assert isinstance(build_emt_model(_small(emt_tiny)), EMT)
    fmri, snp, clinical = _batch(emt_tiny, b=3)
    out = model(fmri, snp, clinical)
    assert out.shape == (3,)
    torch.testing.assert_close(model.patch_means(fmri), patchify(fmri, (6, 6, 4), torch.float32).mean(-1))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fmri, snp, clinical), model(fmri, snp, clinical))


# --------------------------------------------------------------------------- random forest features
def test_summary_features(emt_tiny):
    co = emt_tiny.cohort
    subjects, fmris = [], []
    for i in range(6):
        buf = np.empty(co.fmri.shape, dtype=np.float16)
        subjects.append(make_emt_subject(co, i, buf))
        fmris.append(buf)
    batch = {
        "fmri": np.stack(fmris),
        "snp": torch.from_numpy(np.stack([s["snp"] for s in subjects])),
        "clinical": np.stack([s["clinical"] for s in subjects]),
    }
    X, names = emt_summary_features(batch, co)
    n_pred = co.snp.n_predictive
    assert X.shape == (6, len(names)) and X.dtype == np.float32
    assert len(set(names)) == len(names)
    assert names[:5] == [
        "fmri.right_amygdala.mean",
        "fmri.dorsolateral_prefrontal.mean",
        "fmri.anterior_cingulate.mean",
        "fmri.global.mean",
        "fmri.global.std",
    ]
    assert names[5:9] == ["snp.predictive.count1", "snp.predictive.count2", "snp.other.count1", "snp.other.count2"]
    assert names[9] == "snp.00" and names[9 + n_pred - 1] == f"snp.{n_pred - 1}"
    assert names[9 + n_pred :] == [f"clinical.{n}" for n in co.clinical.names]
    col = {n: X[:, j] for j, n in enumerate(names)}
    for i, s in enumerate(subjects):
        cls = "trd" if s["label"] else "non_trd"
        for region, r in co.regions.items():
            # noise sd 0.08 over >= 120 values: standard error < 0.008
            expect = s["offsets"][region] if r.applies_to == cls else 0.0
            assert abs(col[f"fmri.{region}.mean"][i] - expect) < 0.03, (i, region)
        assert 0.07 < col["fmri.global.std"][i] < 0.2
        g = s["snp"].astype(int)
        assert col["snp.predictive.count2"][i] == (g[:n_pred] == 2).sum()
        assert col["snp.other.count1"][i] == (g[n_pred:] == 1).sum()
        np.testing.assert_array_equal(X[i, 9 : 9 + n_pred], g[:n_pred])
        np.testing.assert_allclose(X[i, 9 + n_pred :], s["clinical"])
    rf = fit_random_forest(X, np.array([s["label"] for s in subjects]), n_estimators=10, seed=0)
    assert rf.n_jobs == 1 and rf.predict_proba(X).shape == (6, 2)


# --------------------------------------------------------------------------- FLOPs
def test_flops_hand_count():
    cfg = EMTModelConfig(d_model=16, n_heads=2, d_ff=32, snp_embed_dim=4, head_hidden=8, n_layers=2)
    shape, n_snps, n_clin = (12, 12, 8, 10), 10, 3
    # N = 8 patches of P = 6*6*4*10 = 1440 values; L = 8 + 5 = 13 tokens
    patch = 2 * 8 * 1440 * 16  # 368640
    snp = 2 * 10 * 4 + 2 * (10 * 4) * 16  # 1360
    clin = 2 * 3 * 16  # 96
    layer = (
        2 * 13 * 16 * 48  # QKV          19968
        + 2 * 13 * 16 * 16  # out proj      6656
        + 2 * 13 * 13 * 16  # Q K^T         5408
        + 2 * 13 * 13 * 16  # attn x V      5408
        + 2 * 2 * 13 * 16 * 32  # FFN        26624
    )
    head = 2 * 16 * 8 + 2 * 8  # 272
    fwd = patch + snp + clin + 2 * layer + head
    assert fwd == 498496
    assert emt_flops_per_sample(cfg, shape, n_snps, n_clin) == 3 * fwd
    # and torch's own counter agrees on the forward (math attention, so its matmuls are seen)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = EMT(cfg, shape, n_snps, n_clin).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *shape), torch.zeros(1, n_snps, dtype=torch.long), torch.zeros(1, n_clin))
    assert fc.get_total_flops() == fwd
