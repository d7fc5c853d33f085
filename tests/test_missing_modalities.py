"""Subjects kept without a modality (on_missing: keep): their shards say what is absent, the
EMT and the late-fusion MLP replace it with a learned "missing" embedding, and the test metrics
are reported per available-modality pattern."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, cli
from trd_hpc.tasks.emt.example import emt_folder

N_WITH, N_WITHOUT = 28, 12  # 30 % of the 40 subjects without genotypes


@pytest.fixture(scope="module")
def keep_cohort(tmp_path_factory):
    src = tmp_path_factory.mktemp("keep_src")
    spec = emt_folder(src, n=N_WITH, spec_extra={"on_missing": "keep"})
    table = src / "participants.tsv"
    df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
    extra = []
    for k in range(2, N_WITHOUT + 1):  # nogeno1 is already there: 11 more, images but no genotypes
        donor = df.iloc[k % len(df)]
        pid = donor["participant_id"].removeprefix("sub-")
        img = next((src / f"sub-{pid}" / "func").glob("*.nii.gz"))
        dst = src / f"sub-nogeno{k}" / "func" / f"sub-nogeno{k}_task-rest_bold.nii.gz"
        dst.parent.mkdir(parents=True)
        shutil.copyfile(img, dst)
        extra.append({**donor.to_dict(), "participant_id": f"sub-nogeno{k}", "trd": "yes" if k % 2 else "no"})
    pd.concat([df, pd.DataFrame(extra)]).to_csv(table, sep="\t", index=False)
    out = src.parent / (src.name + "_cohort")
    r = cli("ingest", str(spec), "--out", str(out), "--quiet")
    assert f"{N_WITH + N_WITHOUT} subjects" in r.stdout and "dropped" not in r.stdout, r.stdout
    return spec, out


def test_the_shards_mark_absent_genotypes_and_hold_no_stand_in_calls(keep_cohort):
    _, out = keep_cohort
    got = {}
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for pid, present, snp in zip(f["participant_id"][...], f["present"][...], f["snp"][...]):
                got[pid.decode()] = (present.tolist(), snp)
    without = [k for k in got if k.startswith("sub-nogeno") or k == "nogeno1"]
    assert len(without) == N_WITHOUT and len(got) == N_WITH + N_WITHOUT
    for k, (present, snp) in got.items():
        if k in without:
            assert present == [1, 0, 1] and not snp.any(), k
        else:
            assert present == [1, 1, 1] and snp.any(), k
    rep = json.loads((out / "ingest_report.json").read_text())
    assert rep["availability"]["genotypes"] == N_WITH


def test_a_cohort_with_30_percent_of_genotypes_missing_trains_and_reports_per_pattern(keep_cohort, tmp_path):
    _, out = keep_cohort
    run = tmp_path / "run"
    cli(
        "train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(run), "--quiet", f"data.cohort={out}",
        "train.max_epochs=2", "eval.baselines=[late_fusion_mlp,random_forest]", "tracking.wandb=false",
    )  # fmt: skip
    m = json.loads((run / "metrics.json").read_text())
    full, partial = "test.by_modality.fmri+genotypes+clinical", "test.by_modality.fmri+clinical"
    assert m[f"{full}.n"] + m.get(f"{partial}.n", 0) == len(
        json.loads((out / "manifest.json").read_text())["splits"]["test"]
    )
    assert any(k.startswith("test.by_modality.") and k.endswith(".too_few") for k in m)  # 6 test subjects: says so
    state = torch.load(run / "model.pt", weights_only=True)
    assert tuple(state["missing"].shape) == (3, 32)  # emt_tiny's d_model
    # the learned embedding is what an absent modality becomes: the model's output depends on `present`
    from trd_hpc.config import load_config
    from trd_hpc.tasks import make_task

    cfg = load_config(run / "config.yaml")
    model = make_task(cfg).build_model()
    model.load_state_dict(state)
    model.eval()
    co = cfg.cohort
    x = (torch.randn(2, *co.fmri_shape), torch.randint(0, 3, (2, co.n_snps)), torch.randn(2, len(co.clinical_names)))
    with torch.no_grad():
        a = model(*x, torch.tensor([[1, 1, 1]] * 2))
        b = model(*x, torch.tensor([[1, 0, 1]] * 2))
    assert not torch.allclose(a, b)
    # predict reads `present` too
    r = cli("predict", str(run), "--cohort", str(out), "--out", str(tmp_path / "p.csv"), "--explain", "--quiet")
    assert np.isfinite(pd.read_csv(tmp_path / "p.csv")["p_trd_raw"]).all(), r.stdout
    # and the exported model takes `present` as its fourth input (checked against PyTorch by export)
    schema = json.loads((run / "bundle" / "schema.json").read_text())
    assert schema["inputs"][-1] == {"name": "present", "shape": [3], "dtype": "uint8", "high": 2}
    r = cli("export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert "outputs equal PyTorch's" in r.stdout, r.stdout


def test_keep_is_refused_for_a_model_of_one_modality(tmp_path):
    from trd_hpc.tasks.cnn3d.example import cnn3d_folder

    spec = cnn3d_folder(tmp_path / "src", n=30, spec_extra={"on_missing": "keep"})
    r = cli("ingest", str(spec), "--out", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "keep needs a model of several modalities" in r.stderr, r.stderr


def test_a_synthetic_missing_rate_hides_modalities_of_the_complete_cohort(tmp_path):
    """cohort.missing.snp=0.3: about 30 % of subjects without genotypes, every other value the
    complete cohort's (its own random stream); the EMT trains on it with its missing tokens."""
    common = ["cohort.n_subjects=120", "cohort.subjects_per_shard=40"]
    cli("generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(tmp_path / "full"), "--quiet", *common)
    cli(
        "generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(tmp_path / "miss"), "--quiet", *common,
        "cohort.missing.snp=0.3",
    )  # fmt: skip

    def arrays(root):
        got: dict = {}
        for p in sorted(root.glob("shard-*.h5")):
            with h5py.File(p, "r") as f:
                for k in f:
                    got.setdefault(k, []).append(f[k][...])
        return {k: np.concatenate(v) for k, v in got.items()}

    full, miss = arrays(tmp_path / "full"), arrays(tmp_path / "miss")
    assert "present" not in full
    absent = miss["present"][:, 1] == 0
    assert 0.2 < absent.mean() < 0.4 and (miss["present"][:, [0, 2]] == 1).all()
    assert not miss["snp"][absent].any() and np.array_equal(miss["snp"][~absent], full["snp"][~absent])
    for k in ("fmri", "clinical", "label"):
        assert np.array_equal(miss[k], full[k]), k
    run = tmp_path / "run"
    cli(
        "train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(run), "--quiet", f"data.cohort={tmp_path / 'miss'}",
        *common, "cohort.missing.snp=0.3", "train.max_epochs=1", "eval.baselines=[]", "tracking.wandb=false",
    )  # fmt: skip
    m = json.loads((run / "metrics.json").read_text())
    assert "test.by_modality.fmri+clinical.n" in m and "test.by_modality.fmri+genotypes+clinical.n" in m
