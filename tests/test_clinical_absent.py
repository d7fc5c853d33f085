"""Under on_missing: keep, a subject whose clinical values are all missing has clinical absent
(``present`` [.., .., 0]): the EMT replaces its clinical token with the missing embedding
instead of reading the training means as if they had been observed; a subject missing only some
values is imputed as before."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import torch

from tests.conftest import CONFIGS, cli
from trd_hpc.tasks.emt.example import emt_folder

CLINICAL = ["age", "hamd", "illness_years"]
N = 30


def _folder(root, blank: int, fill_partial: bool, **spec_extra):
    """The example folder with every clinical value of the first ``blank`` table rows removed."""
    spec = emt_folder(root, n=N, spec_extra={"on_missing": "keep", **spec_extra})
    table = root / "participants.tsv"
    df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
    if fill_partial:  # no subject with only some values missing
        for c in CLINICAL:
            df.loc[df[c].isin(["", "n/a"]), c] = "30"
    df.loc[: blank - 1, CLINICAL] = "n/a"
    df.to_csv(table, sep="\t", index=False)
    return spec, df["participant_id"].iloc[:blank].str.removeprefix("sub-").tolist()


def _flags(cohort) -> dict[str, list[int]]:
    got = {}
    for p in sorted(cohort.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            got.update({k.decode().removeprefix("sub-"): v.tolist() for k, v in zip(f["participant_id"], f["present"])})
    return got


def test_a_subject_without_any_clinical_value_has_clinical_absent_and_the_model_ignores_its_values(tmp_path):
    spec, blanked = _folder(tmp_path / "src", blank=3, fill_partial=False)
    cohort = tmp_path / "cohort"
    cli("ingest", str(spec), "--out", str(cohort), "--quiet")
    flags = _flags(cohort)
    assert len(flags) == N + 1
    for pid, present in flags.items():
        genotypes = 0 if pid == "nogeno1" else 1
        assert present == [1, genotypes, 0 if pid in blanked else 1], (pid, present)
    clinical = json.loads((cohort / "manifest.json").read_text())["source"]["clinical"]
    # the partly missing cells (one age, one hamd) are imputed; the blanked subjects are absent, not imputed
    assert clinical["absent"] == 3 and clinical["imputed"] == {"age": 1, "hamd": 1}

    run = tmp_path / "run"
    cli(
        "train", str(CONFIGS / "emt_tiny.yaml"), "--out", str(run), "--quiet", f"data.cohort={cohort}",
        "train.max_epochs=1", "eval.baselines=[late_fusion_mlp]", "tracking.wandb=false",
    )  # fmt: skip
    from trd_hpc.config import load_config
    from trd_hpc.tasks import make_task

    cfg = load_config(run / "config.yaml")
    co = cfg.cohort
    x = (torch.randn(2, *co.fmri_shape), torch.randint(0, 3, (2, co.n_snps)))
    c1, c2 = torch.zeros(2, len(co.clinical_names)), torch.randn(2, len(co.clinical_names)) * 3
    for path, name in ((run / "model.pt", "emt"), (run / "baselines" / "late_fusion_mlp" / "model.pt", "mlp")):
        model = make_task(cfg if name == "emt" else load_config(path.parent / "config.yaml")).build_model()
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        with torch.no_grad():
            absent = torch.tensor([[1, 1, 0]] * 2)
            assert torch.equal(model(*x, c1, absent), model(*x, c2, absent)), name  # values unused
            observed = torch.tensor([[1, 1, 1]] * 2)
            assert not torch.allclose(model(*x, c1, observed), model(*x, c2, observed)), name
    out = tmp_path / "p.csv"
    cli("predict", str(run), "--cohort", str(cohort), "--out", str(out), "--quiet")
    assert np.isfinite(pd.read_csv(out)["p_trd_raw"]).all()


def test_clinical_missing_error_refuses_partial_rows_but_keeps_empty_ones_absent(tmp_path):
    spec, blanked = _folder(tmp_path / "a", blank=2, fill_partial=True, clinical_missing="error")
    cli("ingest", str(spec), "--out", str(tmp_path / "ca"), "--quiet")
    flags = _flags(tmp_path / "ca")
    assert sorted(pid for pid, p in flags.items() if p[2] == 0) == sorted(blanked)
    # without keep, the same empty rows are missing values, listed
    spec, _ = _folder(tmp_path / "b", blank=2, fill_partial=True, clinical_missing="error", on_missing="drop")
    r = cli("ingest", str(spec), "--out", str(tmp_path / "cb"), check=False)
    assert r.returncode != 0 and "missing clinical values" in r.stderr, r.stderr
