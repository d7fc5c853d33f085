"""Virtual cohorts: a manifest and splits, no shard; subjects regenerated from (seed, i)
when read.  Bit-identical to the sharded cohort of the same config, through the sampler,
loader workers, DDP, exact resume and predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS, cli
from tests.test_trainer import run, train_cmd, weights
from trd_hpc.config import load_config
from trd_hpc.data.dataset import CohortDataset, make_loader
from trd_hpc.data.generate import generate, write_virtual
from trd_hpc.data.sampler import ShardAwareSampler
from trd_hpc.errors import CohortError


@pytest.mark.parametrize("config", ["emt_tiny.yaml", "cnn3d_tiny.yaml"])
def test_a_virtual_cohort_is_bit_identical_to_the_sharded_one(tmp_path, config):
    cfg = load_config(CONFIGS / config, ["cohort.n_subjects=48", "cohort.subjects_per_shard=10"]).cohort
    generate(cfg, tmp_path / "sharded", progress=False)
    write_virtual(cfg, tmp_path / "virtual")
    assert not list((tmp_path / "virtual").glob("shard-*.h5"))
    m_s = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    m_v = json.loads((tmp_path / "virtual" / "manifest.json").read_text())
    assert m_v["virtual"] is True and m_v["splits"] == m_s["splits"] and m_v["folds"] == m_s["folds"]
    assert [s["labels"] for s in m_v["shards"]] == [s["labels"] for s in m_s["shards"]]
    for split in ("all", "train", "test"):
        a, b = CohortDataset(tmp_path / "sharded", split), CohortDataset(tmp_path / "virtual", split)
        order = list(np.random.default_rng(0).permutation(len(a)))  # any order, across shards
        x, y = a.__getitems__(order), b.__getitems__(order)
        assert list(x) == list(y)
        for k in x:
            assert torch.equal(x[k], y[k]), (split, k)
        a.close()
        b.close()
    # the same through the shard-aware sampler and a loader worker process
    ds = CohortDataset(tmp_path / "virtual", "train")
    ref = CohortDataset(tmp_path / "sharded", "train")
    sampler = ShardAwareSampler.for_dataset(ds, num_replicas=1, rank=0, shuffle=True, seed=3, block=4)
    for bx, by in zip(
        make_loader(ds, 8, sampler, num_workers=1, worker_type="process"), make_loader(ref, 8, sampler, num_workers=0)
    ):
        for k in bx:
            assert torch.equal(bx[k], by[k]), k


def test_virtual_is_refused_for_an_ingested_cohort_and_over_a_sharded_one(tmp_path, emt_cohort_dir):
    from trd_hpc.data.manifest import load_manifest

    cfg = load_manifest(emt_cohort_dir).config
    before = (emt_cohort_dir / "manifest.json").read_bytes()
    with pytest.raises(CohortError, match="holds this cohort's shards already"):
        write_virtual(cfg, emt_cohort_dir)
    assert (emt_cohort_dir / "manifest.json").read_bytes() == before
    r = cli(
        "generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(tmp_path / "v"), "--virtual", "--finalize", check=False
    )
    assert r.returncode == 2 and "--virtual writes no shard" in r.stderr
    r = cli("generate", str(CONFIGS / "emt_tiny.yaml"), "--out", str(tmp_path / "v"), "--virtual")
    assert "virtual: 64 subjects" in r.stdout and not list((tmp_path / "v").glob("*.h5"))
    assert cli("cohort", "validate", str(tmp_path / "v"), check=False).returncode == 0


def test_ddp_training_resume_and_predict_on_a_virtual_cohort_match_the_sharded_cohort(tmp_path, emt_cohort_dir):
    """DDP on 2 processes, 2 epochs: the run that makes its cohort virtual (data.source=virtual,
    no shard written) ends with the same weights, bit for bit, as the run on the sharded
    cohort, and so does a virtual run stopped after 1 epoch and resumed; predict on the
    virtual cohort gives the sharded cohort's predictions exactly."""
    common = ["train.strategy=ddp", "train.batch_size=4"]
    sharded, virtual, part = tmp_path / "sharded", tmp_path / "virtual", tmp_path / "part"
    vdir = tmp_path / "vcohort"
    run(train_cmd(sharded, emt_cohort_dir, *common, "train.max_epochs=2", nproc=2))
    r = run(
        train_cmd(virtual, vdir, *common, "train.max_epochs=2", "data.source=virtual", "data.generate=true", nproc=2)
    )
    assert "virtual cohort" in r.stdout and not list(vdir.glob("*.h5"))
    assert json.loads((vdir / "manifest.json").read_text())["virtual"] is True
    w_s, w_v = weights(sharded), weights(virtual)
    assert w_s.keys() == w_v.keys() and all(torch.equal(w_s[k], w_v[k]) for k in w_s)
    run(train_cmd(part, vdir, *common, "train.max_epochs=1", nproc=2))
    run(train_cmd(part, vdir, *common, "train.max_epochs=2", nproc=2, resume=True))
    w_p = weights(part)
    assert all(torch.equal(w_s[k], w_p[k]) for k in w_s)

    # predict needs a bundle: a run with its evaluation
    model = tmp_path / "model"
    cli(
        "train",
        str(CONFIGS / "emt_tiny.yaml"),
        "--out",
        str(model),
        "--quiet",
        f"data.cohort={emt_cohort_dir}",
        "train.max_epochs=1",
        "train.num_threads=1",
        "eval.baselines=[]",
        "tracking.wandb=false",
    )
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    cli("predict", str(model), "--cohort", str(emt_cohort_dir), "--split", "all", "--out", str(a), "--quiet")
    cli("predict", str(model), "--cohort", str(vdir), "--split", "all", "--out", str(b), "--quiet")
    assert a.read_text() == b.read_text()


def test_a_virtual_shard_keeps_no_reference_to_the_batch_it_filled():
    """Memory flat in cohort size: a reader per open shard (up to 32) must not pin the batch
    buffer its last image went into (at the paper's shapes 106 MB each)."""
    from trd_hpc.data.virtual import VirtualShard

    cfg = load_config(CONFIGS / "emt_tiny.yaml", []).cohort
    r = VirtualShard(cfg, 16, 16)
    out = np.empty(tuple(cfg.fmri.shape), dtype=cfg.fmri.dtype)
    r.read("fmri", 3, out)
    snp = np.empty(cfg.snp.n_snps, dtype=np.uint8)
    r.read("snp", 3, snp)
    assert r.scalars["subject_id"][3] == 19 and r._buf is None  # made once, into the batch
    assert not any(isinstance(v, np.ndarray) and np.shares_memory(v, out) for v in r._rest.values())
