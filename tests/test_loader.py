"""Dataset, shard-aware sampler and DataLoader over real shards."""

import numpy as np
import pytest
import torch

from tests.test_generate import read_all
from trd_hpc.data.dataset import CohortDataset, make_loader
from trd_hpc.data.manifest import load_manifest
from trd_hpc.data.sampler import ShardAwareSampler, decode


def _epoch_ids(ds, world, epoch, block=4, shuffle=True):
    per_rank = []
    for r in range(world):
        s = ShardAwareSampler.for_dataset(ds, num_replicas=world, rank=r, seed=3, block=block, shuffle=shuffle)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    return per_rank


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_two_ranks_see_each_subject_of_a_split_once_per_epoch(emt_cohort_dir, split):
    ds = CohortDataset(emt_cohort_dir, split)
    for epoch in (0, 1):
        ranks = _epoch_ids(ds, 2, epoch)
        assert len(ranks[0]) == len(ranks[1])
        real = [decode(i) for r in ranks for i in r]
        seen = [p for p, pad in real if not pad]
        assert sorted(seen) == list(range(len(ds)))  # every subject once, no repeats
        pads = [p for p, pad in real if pad]
        assert len(pads) == (2 - len(ds) % 2) % 2  # padding only to equalise, and marked
    assert _epoch_ids(ds, 2, 0) != _epoch_ids(ds, 2, 1)  # reshuffled by epoch
    assert _epoch_ids(ds, 2, 0) == _epoch_ids(ds, 2, 0)  # deterministic


@pytest.mark.parametrize("world,batch", [(2, 3), (3, 2), (2, 5)])
def test_striped_ranks_together_equal_one_process_with_the_global_batch(emt_cohort_dir, world, batch):
    ds = CohortDataset(emt_cohort_dir, "train")  # 44 subjects
    one = ShardAwareSampler.for_dataset(ds, seed=2, block=4, batch_size=world * batch)
    order = list(one)
    ranks = [
        list(ShardAwareSampler.for_dataset(ds, num_replicas=world, rank=r, seed=2, block=4, batch_size=batch))
        for r in range(world)
    ]
    assert len({len(r) for r in ranks}) == 1
    full = len(order) // (world * batch)
    for k in range(full):  # every full global step: the same samples
        step = sorted(i for r in ranks for i in r[k * batch : (k + 1) * batch])
        assert step == sorted(order[k * world * batch : (k + 1) * world * batch])
    seen = sorted(decode(i)[0] for r in ranks for i in r if not decode(i)[1])
    assert seen == list(range(len(ds)))


def test_sampler_reads_in_contiguous_runs_inside_shards(emt_cohort_dir):
    ds = CohortDataset(emt_cohort_dir, "all")
    order = _epoch_ids(ds, 1, 0, block=8)[0]
    # Runs of `block` consecutive subjects stay together (shuffled inside).
    runs = [sorted(order[i : i + 8]) for i in range(0, len(order), 8)]
    assert all(r == list(range(r[0], r[0] + 8)) for r in runs)
    assert order != sorted(order)


def test_three_ranks_pad_and_loader_marks_padding(emt_cohort_dir):
    ds = CohortDataset(emt_cohort_dir, "val")  # 10 subjects -> 4 per rank, 2 pads
    got, pads = [], 0
    for r in range(3):
        s = ShardAwareSampler.for_dataset(ds, num_replicas=3, rank=r, seed=0, block=2)
        for b in make_loader(ds, 3, s, num_workers=0):
            keep = ~b["is_pad"]
            pads += int(b["is_pad"].sum())
            got += b["subject_id"][keep].tolist()
    assert pads == 2
    assert sorted(got) == sorted(load_manifest(emt_cohort_dir).splits["val"])


def test_items_match_the_files_and_workers_change_nothing(emt_cohort_dir):
    truth = read_all(emt_cohort_dir)
    ds = CohortDataset(emt_cohort_dir, "train")
    out = {}
    # every batch kept (list): a reused buffer handed out twice would show as two equal batches
    for workers, kind in ((2, "process"), (2, "thread"), (1, "thread"), (0, "thread")):
        s = ShardAwareSampler.for_dataset(ds, seed=1, block=4)
        loader = make_loader(ds, 5, s, num_workers=workers, worker_type=kind)
        assert len(loader) == len(list(iter(loader)))
        batches = list(loader)
        if kind == "process":  # the workers opened the shards, the parent did not
            assert not ds._readers
        cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        out[workers, kind] = cat
        ids = cat["subject_id"].numpy()
        assert cat["fmri"].dtype == torch.float16 and cat["snp"].dtype == torch.uint8
        assert np.array_equal(cat["fmri"].numpy(), truth["fmri"][ids])
        assert np.array_equal(cat["snp"].numpy(), truth["snp"][ids])
        assert np.array_equal(cat["clinical"].numpy(), truth["clinical"][ids])
        assert np.array_equal(cat["label"].numpy(), truth["label"][ids])
    for mode in out:
        for k in out[0, "thread"]:
            assert torch.equal(out[0, "thread"][k], out[mode][k]), (mode, k)


def test_split_filter_and_folds(volume_cohort_dir):
    m = load_manifest(volume_cohort_dir)
    folds = [set(m.subjects(f"fold:{k}")) for k in range(5)]
    assert set().union(*folds) == set(range(m.n_subjects))
    assert sum(len(f) for f in folds) == m.n_subjects
    for k in range(5):
        tr, va, te = (set(m.subjects(f"fold:{k}:{p}")) for p in ("train", "val", "test"))
        assert te == folds[k] and not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == set(range(m.n_subjects))
    ds = CohortDataset(volume_cohort_dir, "fold:2:test")
    assert sorted(ds.ids.tolist()) == sorted(folds[2])
    with pytest.raises(Exception, match="unknown split"):
        CohortDataset(volume_cohort_dir, "holdout")


def test_volume_items_are_normalised_and_severity_scaled(volume_cohort_dir):
    ds = CohortDataset(volume_cohort_dir, "train")
    b = ds.__getitems__(list(range(6)))
    v = b["volume"]
    assert v.shape[1] == 1 and v.dtype == torch.float32
    flat = v.view(6, -1)
    assert torch.allclose(flat.min(1).values, torch.zeros(6), atol=1e-5)
    assert torch.allclose(flat.max(1).values, torch.ones(6), atol=1e-5)
    assert ((b["severity"] >= 0) & (b["severity"] <= 1)).all()
    raw = CohortDataset(volume_cohort_dir, "train", normalize_volumes=False).__getitems__([0])
    assert raw["volume"].min() < 0.0  # noise around zero in the background, unnormalised


def test_sampler_resumes_mid_epoch(emt_cohort_dir):
    ds = CohortDataset(emt_cohort_dir, "train")
    s = ShardAwareSampler.for_dataset(ds, seed=5, block=4)
    s.set_epoch(3)
    full = list(s)
    s.start = 7
    state = s.state_dict()
    t = ShardAwareSampler.for_dataset(ds, seed=0, block=4)
    t.load_state_dict(state)
    assert list(t) == full[7:] and len(t) == len(full) - 7


def test_batch_buffers_are_reused_only_when_released(emt_cohort_dir):
    ds = CohortDataset(emt_cohort_dir, "all")
    a = ds.__getitems__([0, 1])
    keep = a["fmri"]
    b = ds.__getitems__([2, 3])
    assert b["fmri"].data_ptr() != keep.data_ptr()  # still held: not overwritten
    assert torch.equal(keep, ds.__getitems__([0, 1])["fmri"])
    ptr = b["fmri"].data_ptr()
    del b
    c = ds.__getitems__([4, 5])
    assert c["fmri"].data_ptr() in (ptr,) or len(ds._pool._bufs) > 0


def _flip(path, row):
    import h5py

    with h5py.File(path, "r") as f:
        off = f["fmri"].id.get_chunk_info_by_coord((row, 0, 0, 0, 0)).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(off + 10)
        b = fh.read(1)[0]
        fh.seek(off + 10)
        fh.write(bytes([b ^ 1]))


def test_each_split_checks_the_rows_it_reads(emt_cohort_copy):
    from trd_hpc.data.shards import CohortError

    m = load_manifest(emt_cohort_copy)
    sid = next(i for i in m.splits["test"] if 16 <= i < 32)
    _flip(emt_cohort_copy / "shard-00001.h5", sid - 16)
    train = CohortDataset(emt_cohort_copy, "train")
    train.verify_all()  # the train rows of shard 1 are intact
    for _b in make_loader(train, 8, ShardAwareSampler.for_dataset(train, seed=0), num_workers=0):
        pass
    test = CohortDataset(emt_cohort_copy, "test")
    with pytest.raises(CohortError, match=rf"shard-00001.h5: subject {sid} "):
        test.verify_all()
    assert not test._readers  # verify_all keeps nothing open (it runs before workers fork)


def test_verify_all_records_the_checked_rows_for_forked_workers(emt_cohort_dir):
    from trd_hpc.data import dataset as dsmod

    dsmod.forget_verified()
    ds = CohortDataset(emt_cohort_dir, "train")
    ds.verify_all()
    assert dsmod._verified and all(
        v[np.unique(ds._row[ds._shard_pos == k])].all() for k, v in zip(range(4), dsmod._verified.values())
    )
    loader = make_loader(ds, 8, ShardAwareSampler.for_dataset(ds, seed=0), num_workers=2, worker_type="process")
    got = [b["subject_id"] for b in loader]
    assert sorted(torch.cat(got).tolist()) == sorted(ds.ids.tolist())


def test_a_manifest_without_per_subject_checksums_falls_back_to_the_shard_checksum(emt_cohort_copy):
    import json

    from trd_hpc.data.shards import CohortError

    p = emt_cohort_copy / "manifest.json"
    m = json.loads(p.read_text())
    for s in m["shards"]:
        del s["row_crc32"]  # as written before per-subject checksums
    p.write_text(json.dumps(m))
    CohortDataset(emt_cohort_copy, "all").verify_all()
    _flip(emt_cohort_copy / "shard-00003.h5", 2)
    with pytest.raises(
        CohortError, match=r"shard-00003.h5: content does not match its checksum .* predates per-subject"
    ):
        CohortDataset(emt_cohort_copy, "all").verify_all()


def test_reading_threads_raise_the_reads_error_when_its_batch_is_due_and_stop_cleanly(emt_cohort_dir):
    from trd_hpc.data.dataset import ThreadLoader

    ds = CohortDataset(emt_cohort_dir, "train")
    s = ShardAwareSampler.for_dataset(ds, seed=0, block=4)
    real = ds.__getitems__
    calls = []

    def failing(indices):
        calls.append(len(indices))
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(indices)

    ds.__getitems__ = failing
    loader = ThreadLoader(ds, 5, s, num_workers=2, prefetch_factor=1)
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for b in loader:
            got.append(b["subject_id"].clone())
    assert len(got) == 2  # the batches before the failed one arrived, in order
    # leaving early: no thread is left reading
    import threading

    it = iter(loader)
    next(it)
    it.close()  # what a `for` loop left by `break` does when its iterator goes away
    assert not [t for t in threading.enumerate() if t.name.startswith("trd-read")]


def test_a_shard_the_lru_closed_is_reopened_from_its_layout_without_hdf5(emt_cohort_copy, monkeypatch):
    """The open-shard LRU closes shards all the time when a split spans more shards than
    max_open_shards; a re-open of the same file must not pay an HDF5 open and the layout
    checks again, and must give the same bytes. A replaced file is opened afresh."""
    import shutil

    from trd_hpc.data import shards

    truth = read_all(emt_cohort_copy)
    opens = []
    real_open = shards.open_shard
    monkeypatch.setattr(shards, "open_shard", lambda p, *a, **k: opens.append(p.name) or real_open(p, *a, **k))
    ds = CohortDataset(emt_cohort_copy, "train", max_open_shards=1)  # 4 shards: every switch closes one
    n_shards = len(np.unique(ds._shard_pos))
    for epoch in range(2):
        s = ShardAwareSampler.for_dataset(ds, seed=epoch, block=2)
        batches = list(make_loader(ds, 5, s, num_workers=0))
        ids = torch.cat([b["subject_id"] for b in batches]).numpy()
        assert np.array_equal(torch.cat([b["fmri"] for b in batches]).numpy(), truth["fmri"][ids])
        assert np.array_equal(torch.cat([b["clinical"] for b in batches]).numpy(), truth["clinical"][ids])
    assert len(ds._readers) == 1
    assert sorted(opens) == sorted(set(opens)) and len(opens) == n_shards  # HDF5 opened once per shard
    assert all(r.file is None for r in ds._readers.values())  # only a descriptor stays open

    # a shard replaced on disk (another inode) is opened through HDF5 again, with its checks
    ds.close()
    p = emt_cohort_copy / "shard-00000.h5"
    shutil.copy2(p, p.with_suffix(".tmp"))
    p.with_suffix(".tmp").replace(p)
    k0 = int(np.unique(ds._shard_pos)[0])
    assert ds.manifest.shards[k0]["file"] == "shard-00000.h5"
    ds._reader(k0)
    assert opens.count("shard-00000.h5") == 2
