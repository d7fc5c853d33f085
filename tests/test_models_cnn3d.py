"""Dual-path 3-D CNN, its baselines and its losses (fast, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CONFIGS
from trd_hpc.config import load_config
from trd_hpc.tasks.cnn3d.config import CNN3DExperiment, CNN3DModelConfig, MultiTaskLossConfig
from trd_hpc.tasks.cnn3d.losses import MultiTaskLoss, focal_loss
from trd_hpc.tasks.cnn3d.model import (
    DualPathCNN3D,
    ResNet18TwoHeads,
    SingleTaskCNN3D,
    build_cnn3d_model,
    cnn3d_flops_per_sample,
    pool_kernels,
)

TINY = (24, 24, 8)
PAPER = (64, 64, 16)
MODEL_NAMES = ["dual_path", "single_task_response", "single_task_severity", "resnet18"]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _exp(name: str, shape, **model) -> CNN3DExperiment:
    exp = CNN3DExperiment()
    exp.cohort.shape = shape
    exp.model = CNN3DModelConfig(name=name, **model)
    return exp


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [TINY, PAPER], ids=["tiny", "paper"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_and_ranges(name, shape):
    if name == "resnet18":
        pytest.importorskip("monai")
    torch.manual_seed(0)
    model = build_cnn3d_model(_exp(name, shape))
    assert isinstance(
        model, ResNet18TwoHeads if name == "resnet18" else DualPathCNN3D if name == "dual_path" else SingleTaskCNN3D
    )
    x = torch.rand(2, 1, *shape)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert set(out) == {"response_logits", "severity"}
        assert out["response_logits"].shape == (2, 3)
        assert out["severity"].shape == (2,)
        assert torch.isfinite(out["response_logits"]).all()
        assert ((out["severity"] >= 0) & (out["severity"] <= 1)).all()
    expected = {
        "dual_path": ("response", "severity"),
        "resnet18": ("response", "severity"),
        "single_task_response": ("response",),
        "single_task_severity": ("severity",),
    }[name]
    assert tuple(model.tasks) == expected
    if name == "single_task_response":
        assert (out["severity"] == 0).all()
    if name == "single_task_severity":
        assert (out["response_logits"] == 0).all()


def test_builders_and_configs():
    for path in ("cnn3d.yaml", "cnn3d_tiny.yaml"):
        exp = load_config(CONFIGS / path)
        model = build_cnn3d_model(exp)
        assert isinstance(model, DualPathCNN3D)
        assert model.in_shape == tuple(exp.cohort.shape)
    assert isinstance(build_cnn3d_model(_exp("single_task_severity", TINY)), SingleTaskCNN3D)
    assert build_cnn3d_model(_exp("single_task_response", TINY)).tasks == ("response",)


def test_pool_rule_keeps_thin_axis():
    # Pool an axis by 2 only while it is >= 4 voxels.
    assert pool_kernels(PAPER, 3) == [(2, 2, 2)] * 3
    assert pool_kernels(TINY, 3) == [(2, 2, 2), (2, 2, 2), (2, 2, 1)]
    enc = DualPathCNN3D(CNN3DModelConfig(), TINY).encoder
    assert enc(torch.rand(1, 1, *TINY)).shape == (1, 64, 3, 3, 2)
    assert enc.out_shape == (3, 3, 2)
    enc = DualPathCNN3D(CNN3DModelConfig(), PAPER).encoder
    assert enc.out_shape == (8, 8, 2)
    # more blocks than the z axis allows still runs
    model = DualPathCNN3D(CNN3DModelConfig(channels=(4, 4, 4, 4, 4)), TINY)
    assert model(torch.rand(2, 1, *TINY))["response_logits"].shape == (2, 3)


def test_fewer_pooled_blocks_keep_a_finer_grid_for_the_paths():
    assert pool_kernels(PAPER, 3, pooled_blocks=2) == [(2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert pool_kernels(PAPER, 3, pooled_blocks=0) == [(1, 1, 1)] * 3
    for name in ("dual_path", "single_task_severity"):
        model = build_cnn3d_model(_exp(name, PAPER, pooled_blocks=2))
        assert model.encoder.out_shape == (16, 16, 4)
        assert model.encoder(torch.rand(1, 1, *PAPER)).shape == (1, 64, 16, 16, 4)
        assert model(torch.rand(2, 1, *PAPER))["severity"].shape == (2,)


# --------------------------------------------------------------------------- focal loss
def test_focal_loss_matches_hand_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    target = torch.tensor([0, 2, 1])
    alpha, gamma = 0.25, 2.0
    expected = []
    for row, t in zip(logits.tolist(), target.tolist()):
        z = sum(math.exp(v) for v in row)
        p = math.exp(row[t]) / z
        expected.append(-alpha * (1 - p) ** gamma * math.log(p))
    got = focal_loss(logits, target, alpha, gamma, reduction="none")
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert focal_loss(logits, target, alpha, gamma).item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert focal_loss(logits, target, alpha, gamma, reduction="sum").item() == pytest.approx(sum(expected), abs=1e-6)
    # a per-class alpha picks alpha[target]
    per_class = focal_loss(logits, target, [0.1, 0.2, 0.3], gamma, reduction="none")
    assert torch.allclose(per_class, got / alpha * torch.tensor([0.1, 0.3, 0.2]), atol=1e-6)


def test_focal_loss_gamma0_alpha1_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(16, 3) * 3
    target = torch.randint(0, 3, (16,))
    assert torch.allclose(focal_loss(logits, target, 1.0, 0.0), F.cross_entropy(logits, target), atol=1e-6)


def test_focal_loss_downweights_easy_examples():
    # easy: p_t ~ 0.9; hard: p_t ~ 0.2
    easy = torch.tensor([[math.log(0.9), math.log(0.05), math.log(0.05)]])
    hard = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.4)]])
    t = torch.tensor([0])
    ce_ratio = (focal_loss(easy, t, 1.0, 0.0) / focal_loss(hard, t, 1.0, 0.0)).item()
    fl_ratio = (focal_loss(easy, t, 1.0, 2.0) / focal_loss(hard, t, 1.0, 2.0)).item()
    # the focal term scales the ratio by ((1 - 0.9) / (1 - 0.2))^2 = 1/64
    assert fl_ratio == pytest.approx(ce_ratio * (0.1 / 0.8) ** 2, rel=1e-4)
    assert fl_ratio < ce_ratio / 50


def test_focal_loss_is_stable_for_extreme_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0, 0]), 0.25, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(0.25 * 2000 / 2, rel=1e-5)  # second sample: log p_t = -2000
    bf16 = focal_loss(logits.detach().bfloat16(), torch.tensor([0, 0]), 0.25, 2.0)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)


# --------------------------------------------------------------------------- multi-task loss
def _fake_outputs():
    torch.manual_seed(1)
    out = {"response_logits": torch.randn(6, 3), "severity": torch.rand(6)}
    response = torch.tensor([0, 1, 2, 1, 1, 0])
    severity = torch.rand(6)
    return out, response, severity


def test_multitask_loss_weights():
    out, response, severity = _fake_outputs()
    mse = F.mse_loss(out["severity"], severity)
    focal = focal_loss(out["response_logits"], response, 0.25, 2.0)
    total, parts = MultiTaskLoss(MultiTaskLossConfig())(out, response, severity)
    assert total.item() == pytest.approx(0.4 * mse.item() + 0.6 * focal.item(), rel=1e-6)
    assert parts["loss.severity"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert parts["loss.response"].item() == pytest.approx(focal.item(), rel=1e-6)
    total2, _ = MultiTaskLoss(MultiTaskLossConfig(severity_weight=1.0, response_weight=2.0))(out, response, severity)
    assert total2.item() == pytest.approx(mse.item() + 2.0 * focal.item(), rel=1e-6)
    total3, _ = MultiTaskLoss(MultiTaskLossConfig(focal_alpha=0.5, focal_gamma=0.0))(out, response, severity)
    ce = F.cross_entropy(out["response_logits"], response)
    assert total3.item() == pytest.approx(0.4 * mse.item() + 0.6 * 0.5 * ce.item(), rel=1e-6)


def test_multitask_loss_single_task_ignores_other_task():
    out, response, severity = _fake_outputs()
    cfg = MultiTaskLossConfig()
    only_resp = MultiTaskLoss(cfg, tasks=("response",))
    only_sev = MultiTaskLoss(cfg, tasks=("severity",))
    t_resp, p_resp = only_resp(out, response, severity)
    t_sev, p_sev = only_sev(out, response, severity)
    assert t_resp.item() == pytest.approx(0.6 * focal_loss(out["response_logits"], response).item(), rel=1e-6)
    assert t_sev.item() == pytest.approx(0.4 * F.mse_loss(out["severity"], severity).item(), rel=1e-6)
    assert p_resp["loss.severity"].item() == 0 and p_sev["loss.response"].item() == 0
    # changing the other task's prediction or target changes nothing
    out2 = {"response_logits": out["response_logits"], "severity": 1 - out["severity"]}
    assert only_resp(out2, response, 1 - severity)[0].item() == t_resp.item()
    out3 = {"response_logits": -out["response_logits"], "severity": out["severity"]}
    assert only_sev(out3, (response + 1) % 3, severity)[0].item() == t_sev.item()
    with pytest.raises(ValueError):
        MultiTaskLoss(cfg, tasks=("grade",))


def test_single_task_models_train_only_their_task():
    torch.manual_seed(0)
    for task in ("response", "severity"):
        model = SingleTaskCNN3D(CNN3DModelConfig(channels=(4, 8)), TINY, task)
        loss_fn = MultiTaskLoss(MultiTaskLossConfig(), tasks=model.tasks)
        total, parts = loss_fn(model(torch.rand(3, 1, *TINY)), torch.tensor([0, 1, 2]), torch.rand(3))
        total.backward()
        other = "severity" if task == "response" else "response"
        assert parts[f"loss.{other}"].item() == 0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_single_task_baselines_stop_on_and_report_their_own_target():
    import numpy as np

    from trd_hpc.config import validate_experiment
    from trd_hpc.tasks.cnn3d.spec import CNN3DTask

    base = load_config(CONFIGS / "cnn3d.yaml")
    assert base.train.early_stopping.monitor == "val.accuracy"
    rng = np.random.default_rng(0)
    rec = {
        "response_logits": rng.normal(size=(6, 3)).astype(np.float32),
        "severity_pred": rng.random(6).astype(np.float32),
        "response": np.array([0, 1, 2, 0, 1, 2]),
        "severity": rng.random(6).astype(np.float32),
    }
    for name, monitor, mode, absent in (
        ("single_task_severity", "val.severity_mae", "min", "accuracy"),
        ("single_task_response", "val.accuracy", "max", "severity_mae"),
    ):
        data = base.model_dump(mode="json")
        data["model"]["name"] = name
        data["train"]["plateau"]["monitor"] = "val.severity_mae"  # a foreign monitor is switched too
        cfg = validate_experiment(data)
        assert (cfg.train.early_stopping.monitor, cfg.train.early_stopping.mode) == (monitor, mode)
        assert cfg.train.plateau.monitor == monitor
        m = CNN3DTask(cfg).metrics(rec)
        assert absent not in m and monitor.removeprefix("val.") in m and math.isfinite(m["loss"])
    # the dual-path model keeps both metrics and the configured monitors
    m = CNN3DTask(base).metrics(rec)
    assert {"accuracy", "severity_mae"} <= set(m)


# --------------------------------------------------------------------------- attention, BN
@pytest.mark.parametrize("attention", ["se", "spatial"])
def test_attention_changes_output_and_gradients_reach_both_paths(attention):
    cfg = dict(channels=(4, 8), dense=8)
    torch.manual_seed(0)
    plain = DualPathCNN3D(CNN3DModelConfig(attention="none", **cfg), TINY).eval()
    torch.manual_seed(0)
    att = DualPathCNN3D(CNN3DModelConfig(attention=attention, **cfg), TINY).eval()
    # same encoder and heads; only the attention modules are extra
    missing, unexpected = att.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".attention." in k for k in missing)
    x = torch.rand(2, 1, *TINY)
    a, b = plain(x), att(x)
    assert not torch.allclose(a["response_logits"], b["response_logits"])
    assert not torch.allclose(a["severity"], b["severity"])
    # each path has its own attention parameters
    assert any(k.startswith("severity_path.attention.") for k in missing)
    assert any(k.startswith("response_path.attention.") for k in missing)

    att.train()
    total, _ = MultiTaskLoss()(att(x), torch.tensor([0, 2]), torch.tensor([0.2, 0.9]))
    total.backward()
    for path in (att.severity_path, att.response_path):
        grads = [p.grad for p in path.attention.parameters()]
        # (one SE unit may sit in a dead ReLU; the module as a whole must learn)
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in path.head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in att.encoder.parameters())


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    model = DualPathCNN3D(CNN3DModelConfig(), TINY)
    x = torch.rand(4, 1, *TINY)
    model.train()
    model(x)  # update running stats
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = model(x)
        c = model(x[:1])  # the batch does not matter in eval mode
    assert torch.equal(a["response_logits"], b["response_logits"]) and torch.equal(a["severity"], b["severity"])
    assert torch.allclose(a["response_logits"][:1], c["response_logits"], atol=1e-5)
    model.train()
    with torch.no_grad():
        d = model(x)  # dropout + batch statistics
    assert not torch.equal(a["response_logits"], d["response_logits"])


# --------------------------------------------------------------------------- flops
def test_flops_positive_and_grows_with_channels():
    small = cnn3d_flops_per_sample(DualPathCNN3D(CNN3DModelConfig(channels=(8, 16)), TINY), TINY)
    big = cnn3d_flops_per_sample(DualPathCNN3D(CNN3DModelConfig(channels=(16, 32)), TINY), TINY)
    assert 0 < small < big
    # first conv by hand: 24*24*8 outputs x 8 channels x 27 MACs, x2 FLOPs x3 training
    assert small > 6 * 24 * 24 * 8 * 8 * 27
    model = DualPathCNN3D(CNN3DModelConfig(), PAPER)
    model.train()
    f_paper = cnn3d_flops_per_sample(model, PAPER)
    assert model.training  # mode restored
    assert f_paper > cnn3d_flops_per_sample(DualPathCNN3D(CNN3DModelConfig(), TINY), TINY)


# --------------------------------------------------------------------------- overfit
def test_dual_path_overfits_separable_tiny_volumes():
    torch.manual_seed(0)
    n = 12
    response = torch.arange(n) % 3
    severity = (2 - response).float() / 2 * 0.8 + 0.1
    volume = (0.15 + 0.35 * response.float())[:, None, None, None, None] + 0.05 * torch.rand(n, 1, *TINY)
    model = DualPathCNN3D(CNN3DModelConfig(), TINY)
    loss_fn = MultiTaskLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    acc = 0.0
    for step in range(60):
        model.train()
        total, _ = loss_fn(model(volume), response, severity)
        opt.zero_grad()
        total.backward()
        opt.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                acc = (model(volume)["response_logits"].argmax(1) == response).float().mean().item()
            if acc == 1.0:
                break
    assert acc == 1.0, f"train accuracy {acc} after {step + 1} steps"
