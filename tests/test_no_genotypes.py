"""A cohort with no genotypes at all (synthetic ``cohort.snp.n_snps: 0``, or an ingest spec
without ``genotypes:``): no ``snp`` column in its shards, an EMT and a late-fusion MLP without a
SNP branch that take (fmri, clinical[, present]), and metrics, report and manifest that say the
genotypes are absent; train, predict and export work."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import CONFIGS, cli
from trd_hpc.tasks.emt.example import emt_folder

NO_SNPS = ["cohort.snp.n_snps=0", "cohort.snp.n_predictive=0"]
N = 30  # emt_folder adds nogeno1, whom a cohort without genotypes keeps


def _shard_keys(cohort) -> set[str]:
    keys = set()
    for p in sorted(cohort.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            keys |= set(f)
    return keys


def _check_run(run, cohort, tmp_path, inputs: list[str]) -> None:
    """The run says genotypes are absent; its model has no SNP part; predict and export work."""
    m = json.loads((run / "metrics.json").read_text())
    assert m["genotypes"].startswith("absent") and np.isfinite(m["test.auc"])
    assert "Genotypes absent" in (run / "report.html").read_text()
    state = torch.load(run / "model.pt", weights_only=True)
    assert state and not [k for k in state if "snp" in k]
    schema = json.loads((run / "bundle" / "schema.json").read_text())
    assert [i["name"] for i in schema["inputs"]] == inputs and schema["n_snps"] == 0
    out = tmp_path / f"{run.name}.csv"
    cli("predict", str(run), "--cohort", str(cohort), "--out", str(out), "--explain", "--quiet")
    assert np.isfinite(pd.read_csv(out)["p_trd_raw"]).all()
    r = cli("export", str(run), "--format", "torchscript", "--out", str(tmp_path / f"{run.name}.pt"))
    assert "outputs equal PyTorch's" in r.stdout, r.stdout


def test_a_synthetic_cohort_without_genotypes_trains_predicts_and_says_so(tmp_path):
    cohort, run = tmp_path / "cohort", tmp_path / "run"
    cli(
        "train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(run), "--generate", "--quiet", f"data.cohort={cohort}",
        *NO_SNPS, "train.max_epochs=1", "eval.baselines=[late_fusion_mlp,random_forest]", "tracking.wandb=false",
    )  # fmt: skip
    assert "snp" not in _shard_keys(cohort) and "fmri" in _shard_keys(cohort)
    _check_run(run, cohort, tmp_path, ["fmri", "clinical"])
    # the late-fusion MLP is adapted (no SNP encoder), the random forest has no SNP feature
    mlp = torch.load(run / "baselines" / "late_fusion_mlp" / "model.pt", weights_only=True)
    assert not [k for k in mlp if "snp" in k]
    top = json.loads((run / "baselines" / "random_forest" / "top_features.json").read_text())
    assert top and not [n for n, _ in top if n.startswith("snp")]
    m = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(m["baselines.late_fusion_mlp.auc"]) and np.isfinite(m["baselines.random_forest.auc"])


def test_hiding_genotypes_of_a_cohort_without_any_is_refused(tmp_path):
    r = cli(
        "generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(tmp_path / "c"), *NO_SNPS, "cohort.missing.snp=0.3",
        check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "snp.n_snps is 0" in r.stderr, r.stderr


def _spec_without_genotypes(root, **extra):
    spec = emt_folder(root, n=N, spec_extra=extra)
    d = yaml.safe_load(spec.read_text())
    del d["genotypes"], d["snps"]
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    return spec


@pytest.mark.parametrize("on_missing", ["drop", "keep"])
def test_an_ingested_cohort_without_genotypes_trains_predicts_and_says_so(tmp_path, on_missing):
    spec = _spec_without_genotypes(tmp_path / "src", on_missing=on_missing)
    cohort, run = tmp_path / "cohort", tmp_path / "run"
    r = cli("ingest", str(spec), "--out", str(cohort), "--quiet")
    assert f"{N + 1} subjects" in r.stdout, r.stdout  # nogeno1 lacks nothing the spec needs
    man = json.loads((cohort / "manifest.json").read_text())
    assert man["source"]["genotypes"].startswith("absent") and "genotypes" not in man["source"]["formats"]
    assert man["config"]["genotypes"] is None and man["config"]["snp_ids"] == []
    assert "snp" not in _shard_keys(cohort)
    if on_missing == "keep":  # genotypes absent for everyone
        for p in sorted(cohort.glob("shard-*.h5")):
            with h5py.File(p, "r") as f:
                assert (f["present"][:, 1] == 0).all() and (f["present"][:, 0] == 1).all()
    cli(
        "train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(run), "--quiet", f"data.cohort={cohort}",
        "train.max_epochs=1", "eval.baselines=[]", "tracking.wandb=false",
    )  # fmt: skip
    _check_run(run, cohort, tmp_path, ["fmri", "clinical", *(["present"] if on_missing == "keep" else [])])
    # straight from the subject folder, no genotypes asked for: the probabilities of ingest + predict
    folder = tmp_path / "from-folder.tsv"
    cli("predict", str(run), "--bids", str(spec.parent), "--out", str(folder), "--quiet")
    got = pd.read_csv(folder, sep="\t")
    want = pd.read_csv(tmp_path / f"{run.name}.csv")
    id_col = next(c for c in got.columns if c in want.columns and "participant" in c)
    both = want.merge(got, on=id_col, suffixes=("", "_folder"))
    assert len(got) == N + 1 and len(both) == len(want) > 0  # every subject of the folder; the test split within
    assert np.allclose(both["p_trd_raw"], both["p_trd_raw_folder"], rtol=0, atol=1e-7)  # as the two files round them


def test_a_spec_selecting_snps_without_genotypes_is_refused(tmp_path):
    spec = _spec_without_genotypes(tmp_path / "src")
    d = yaml.safe_load(spec.read_text())
    d["snps"] = {"first": 10}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    r = cli("ingest", str(spec), "--out", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "snps selects variants of genotypes:" in r.stderr, r.stderr
