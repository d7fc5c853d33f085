"""``trd-hpc bench gpu``: its CPU mode (what CI runs) end to end, and the parts that decide a
figure or a verdict (the weight comparison of the resume check, MFU above 100 %, a failed stage)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli

MODELS = ("emt", "cnn3d")
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # the CPU mode even on a machine with a GPU


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-gpu")
    js = d / "out" / "gpu.json"
    # --device auto without a visible GPU is the CPU mode
    r = cli("bench", "gpu", "--json", str(js), "--dir", str(d / "scratch"), env=NO_GPU, check=False, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r, js, json.loads(js.read_text())


@pytest.mark.slow
def test_cpu_mode_writes_every_figure_for_both_models(cpu_run):
    r, js, f = cpu_run
    assert f["benchmark"] == "gpu" and f["mode"] == "cpu" and f["complete"] is True
    assert f["failed_stages"] == []
    assert f["device"] and f["environment"]["torch"] == torch.__version__ and "cuda" in f["environment"]
    assert f["units"]["*_bytes"] == "bytes"
    for name in MODELS:
        m = f["models"][name]
        assert m["cohort"]["status"] == "ok"
        for p in ("bf16", "fp16", "fp32"):
            x = m["precisions"][p]
            assert x["status"] == "ok", x
            assert x["samples_per_s"] > 0 and x["achieved_flops_per_s"] > 0
            # a CPU has no allocator peak: null with its reason, the process's peak RSS beside it
            assert x["peak_memory_bytes"] is None and x["peak_memory_reason"] and x["process_peak_rss_bytes"] > 0
        assert "note" in m["precisions"]["bf16"] and "note" not in m["precisions"]["fp32"]
        assert m["precisions"]["fp16"]["grad_scaler"] is True and m["precisions"]["bf16"]["grad_scaler"] is False
        assert m["precisions"]["bf16"]["autocast_dtype"] == "bfloat16"
        assert m["precisions"]["fp32"]["autocast_dtype"] is None
        ds = m["data_stall"]
        assert ds["status"] == "ok" and ds["hdf5_over_resident"] > 0
        assert ds["hdf5_over_resident"] == pytest.approx(ds["hdf5_samples_per_s"] / ds["resident_samples_per_s"])
        mfu = m["mfu"]
        assert mfu["status"] == "ok" and mfu["yardstick_dtype"] == "float32"
        assert mfu["peak_flops"] == max(mfu["square_matmul_flops"], mfu["model_gemm_flops"] or 0)
        assert 0 < mfu["mfu"]["fp32"] <= 1
        assert all(v is None or 0 < v <= 1 for v in mfu["mfu"].values())
    assert f"figures: {js}" in r.stdout
    assert "bench gpu: [emt fp32] ..." in r.stdout and "bench gpu: [cnn3d exact resume] ok" in r.stdout


@pytest.mark.slow
def test_cpu_mode_resumes_bit_identically_and_runs_deepspeed_in_one_process(cpu_run):
    _, _, f = cpu_run
    for name in MODELS:
        rs = f["models"][name]["resume"]
        assert rs["status"] == "ok" and rs["passed"] is True
        assert rs["bit_identical"] is True and rs["max_abs_diff"] == 0.0 and rs["criterion"].startswith("bit")
        assert rs["killed_at"] == "after-step:3" and rs["tensors"] > 0
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        assert f["deepspeed"]["process_group"]["status"] == "skipped"
        return
    pg = f["deepspeed"]["process_group"]
    assert pg["status"] == "ok" and pg["backend"] == "gloo" and pg["world_size"] == 1
    for name in f["plan"]["deepspeed_models"]:
        for stage in (1, 2):
            x = f["deepspeed"][f"{name}_zero{stage}"]
            assert x["status"] == "ok", x
            assert x["zero_stage"] == stage and x["samples_per_s"] > 0 and x["precision"] == "fp32"


def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    js = tmp_path / "gpu.json"
    r = cli("bench", "gpu", "--device", "cuda", "--json", str(js), env=NO_GPU, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench gpu --device cuda: no CUDA device"), r.stderr
    assert not js.exists()


def test_the_weight_comparison_tells_bit_identity_from_a_small_difference(tmp_path):
    from trd_hpc.bench.gpu_resume import compare_weights

    a = {"w": torch.tensor([1.0, -2.0, 4.0]), "n": torch.tensor(3)}
    torch.save(a, tmp_path / "a.pt")
    torch.save({"w": a["w"].clone(), "n": a["n"].clone()}, tmp_path / "same.pt")
    torch.save({"w": torch.tensor([1.0, -2.0, 4.0 + 2**-18]), "n": torch.tensor(3)}, tmp_path / "near.pt")
    torch.save({"w": a["w"].clone(), "n": torch.tensor(4)}, tmp_path / "count.pt")
    same = compare_weights(tmp_path / "a.pt", tmp_path / "same.pt")
    assert same["bit_identical"] and same["max_abs_diff"] == 0
    near = compare_weights(tmp_path / "a.pt", tmp_path / "near.pt")
    assert not near["bit_identical"] and near["differing_tensors"] == 1 and near["integer_buffers_equal"]
    assert near["max_rel_diff"] == 2**-20 and near["max_abs_diff"] == 2**-18  # exact in float32
    assert not compare_weights(tmp_path / "a.pt", tmp_path / "count.pt")["integer_buffers_equal"]


def test_mfu_above_the_measured_peak_is_measured_again_then_null():
    from trd_hpc.bench.gpu_train import mfu_stage

    class Meter:  # a yardstick that never rises: the second measurement cannot rescue the figure
        dtype = torch.float32

        def __init__(self):
            self.square, self.calls = [100.0], 0

        def __call__(self):
            self.calls += 1
            self.square.append(100.0)

        def figures(self):
            return {"peak_flops": max(self.square), "square_matmul_flops": max(self.square)}

    meter = Meter()
    precisions = {
        "fp32": {"status": "ok", "achieved_flops_per_s": 50.0},
        "bf16": {"status": "ok", "achieved_flops_per_s": 150.0},
        "fp16": {"status": "failed"},
    }
    out = mfu_stage(precisions, meter)
    assert meter.calls == 1 and out["remeasured"] is True
    assert out["mfu"] == {"fp32": 0.5, "bf16": None} and "bf16" in out["mfu_reason"]


def test_a_failed_stage_keeps_its_traceback_and_fails_the_run(tmp_path):
    from trd_hpc.bench.gpu import Run
    from trd_hpc.bench.gpu_train import Skipped

    run = Run(tmp_path / "gpu.json", torch.device("cpu"))

    def broken():
        raise RuntimeError("CUDA out of memory (as a GPU would say)")

    def skipped():
        raise Skipped("no bf16 on this device")

    assert run.stage("ok", lambda: {"samples_per_s": 1.0})["status"] == "ok"
    bad = run.stage("broken", broken)
    assert bad["status"] == "failed" and "Traceback" in bad["error"] and "out of memory" in bad["error"]
    skip = run.stage("skipped", skipped)
    assert skip["status"] == "skipped" and skip["reason"] == "no bf16 on this device"
    assert run.res["failed_stages"] == ["broken"]  # a skip is not a failure
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written["failed_stages"] == ["broken"] and written["complete"] is False
