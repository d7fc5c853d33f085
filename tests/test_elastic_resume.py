"""Elastic exact resume end to end: a DDP run killed mid-epoch at one world size and resumed
at another trains, in every epoch, on each training subject once (the run's own ledger,
``train.ledger``, read with the lost work of the killed attempt removed).  The sampler-level
cases (accumulation, 3 ranks, resuming twice): tests/test_sampler_elastic.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.test_trainer import history, run, train_cmd
from trd_hpc.data.manifest import load_manifest

COMMON = ["train.batch_size=4", "train.checkpoint_every_steps=3", "train.ledger=true", "train.max_epochs=2"]


def ledger_rows(run_dir: Path) -> list[tuple[int, int, int, int]]:
    """(epoch, step, subject id, pad) of the work the finished run kept: an attempt's rows past
    the step the next attempt resumed from were lost with its kill."""
    attempts: dict[int, list[Path]] = {}
    for f in sorted((run_dir / "ledger").glob("from-step*.tsv")):
        attempts.setdefault(int(f.name.split("-")[1][4:]), []).append(f)
    starts = sorted(attempts)
    kept = []
    for i, start in enumerate(starts):
        until = starts[i + 1] if i + 1 < len(starts) else None
        for f in attempts[start]:
            for line in f.read_text().splitlines():
                epoch, step, sid, pad = (int(x) for x in line.split("\t"))
                if until is None or step <= until:
                    kept.append((epoch, step, sid, pad))
    return kept


def assert_each_subject_once_per_epoch(run_dir: Path, cohort: Path, epochs: int) -> None:
    train = sorted(load_manifest(cohort).subjects("train"))
    rows = ledger_rows(run_dir)
    for e in range(epochs):
        seen = Counter(sid for epoch, _, sid, pad in rows if epoch == e and not pad)
        assert sorted(seen) == train, f"epoch {e}: skipped {sorted(set(train) - set(seen))}"
        assert max(seen.values()) == 1, f"epoch {e}: twice {[s for s, c in seen.items() if c > 1]}"


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["elastic-2-to-1", "elastic-1-to-2"])
def test_elastic_resume_mid_epoch_at_another_world_size_trains_each_subject_once(
    tmp_path, emt_cohort_dir, before, after
):
    out = tmp_path / "run"
    strategy = ["train.strategy=ddp"] if before > 1 else []
    killed = run(
        train_cmd(out, emt_cohort_dir, *COMMON, *strategy, nproc=before),
        check=False,
        env={"TRD_FAULT": "after-step:4", "TRD_FAULT_KILL": "group" if before > 1 else "self"},
    )
    assert killed.returncode != 0
    assert (out / "ledger").is_dir() and not (out / "model.pt").exists()
    strategy = ["train.strategy=ddp"] if after > 1 else ["train.strategy=single"]
    r = run(train_cmd(out, emt_cohort_dir, *COMMON, *strategy, nproc=after, resume=True))
    assert "resumed from" in r.stdout
    assert [row["epoch"] for row in history(out)] == [1, 2]
    starts = {int(f.name.split("-")[1][4:]) for f in (out / "ledger").glob("*.tsv")}
    assert starts == {0, 3}, starts  # the kill after step 4 lost it; the resume started after step 3
    assert_each_subject_once_per_epoch(out, emt_cohort_dir, epochs=2)


# Loads a ZeRO checkpoint of another world size into a one-process engine, as a resume does, and
# prints whether its weights equal the partitions consolidated by DeepSpeed's zero_to_fp32.
_LOAD_AT_ONE = """
import sys
from pathlib import Path
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from trd_hpc.rundir import RunDir
from trd_hpc.tasks import make_task
from trd_hpc.train import distributed as D
from trd_hpc.train.strategy import make_strategy

run, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
cfg = RunDir(run).config()
torch.manual_seed(12345)  # weights unlike the checkpoint's until it is loaded
info = D.init("deepspeed", "cpu")
s = make_strategy(cfg.train, info, info.device)
s.setup(make_task(cfg, str(cfg.data.cohort)).build_model())
client = s.load(ckpt, None, lambda p, t: None)
want = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
have = s.engine.module.state_dict()
diff = max(float((have[k].float() - want[k].float()).abs().max()) for k in want)
print("loaded", sorted(want) == sorted(k for k in have if k in want), diff, client["trainer"]["step"])
"""


@pytest.mark.slow
def test_elastic_zero2_resumes_2_to_1_through_a_universal_checkpoint(tmp_path, emt_cohort_dir):
    """ZeRO-2 partitions written by 2 ranks reload at 1 through DeepSpeed's universal checkpoint
    conversion: the weights equal the consolidated partitions, and the resumed run trains each
    subject once per epoch."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    ds = ["train.strategy=deepspeed", "train.deepspeed_config=zero2_bf16.json", "train.precision=fp32"]
    out = tmp_path / "run"
    killed = run(
        train_cmd(out, emt_cohort_dir, *COMMON, *ds, nproc=2),
        check=False,
        env={"TRD_FAULT": "after-step:4", "TRD_FAULT_KILL": "group"},
    )
    assert killed.returncode != 0 and not (out / "model.pt").exists()
    ckpt = out / "checkpoints" / "step-000000003"
    assert (ckpt / "complete").exists()
    probe = tmp_path / "probe.py"
    probe.write_text(_LOAD_AT_ONE)
    r = subprocess.run([sys.executable, str(probe), str(out), str(ckpt)], capture_output=True, text=True, timeout=600)
    line = [x for x in r.stdout.splitlines() if x.startswith("loaded")]
    assert r.returncode == 0 and line, r.stdout + r.stderr
    _, same_keys, diff, step = line[0].split()
    assert same_keys == "True" and float(diff) == 0.0 and int(step) == 3, line
    assert (ckpt / "universal" / "complete").exists()
    r = run(train_cmd(out, emt_cohort_dir, *COMMON, *ds, nproc=1, resume=True))
    assert "resumed from" in r.stdout and "step-000000003" in r.stdout
    assert [row["epoch"] for row in history(out)] == [1, 2]
    assert_each_subject_once_per_epoch(out, emt_cohort_dir, epochs=2)
