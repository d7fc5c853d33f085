"""``train.ledger``: every trained sample's (epoch, step, subject id, padding), per rank and attempt.

A file per rank and attempt, ``RUN/ledger/from-stepNNNNNN-worldW-rankR.tsv``, named by the
step the attempt started from: an attempt's rows past the step the next attempt resumed from
are work lost with a kill (``tests/test_elastic_resume.py`` reads the ledger so).  Rows are
flushed before each checkpoint, so every row up to a checkpoint is on disk with it.
"""

from __future__ import annotations

from pathlib import Path


class Ledger:
    def __init__(self, run_dir: Path, start_step: int, world_size: int, rank: int):
        d = Path(run_dir) / "ledger"
        d.mkdir(exist_ok=True)
        self.file = open(d / f"from-step{start_step:06d}-world{world_size}-rank{rank}.tsv", "w")  # noqa: SIM115

    def write(self, epoch: int, step: int, batch: dict) -> None:
        ids, pads = batch["subject_id"].tolist(), batch["is_pad"].tolist()
        self.file.writelines(f"{epoch}\t{step}\t{i}\t{int(p)}\n" for i, p in zip(ids, pads))

    def flush(self) -> None:
        self.file.flush()
