"""Per-subject random streams.

Subject ``i`` of a cohort draws only from streams derived from ``(seed, i)``, so
the subject is the same whichever shard, process or SLURM array task makes it.
"""

from __future__ import annotations

import numpy as np
import torch


def subject_seedseq(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=seed, spawn_key=(index,))


def subject_streams(seed: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """A numpy Generator for the small draws and a torch Generator for bulk noise.

    torch's CPU ``randn`` is ~2.5x faster than numpy's for millions of floats;
    its stream is fixed for a given torch version (recorded in the manifest).
    """
    ss = subject_seedseq(seed, index)
    np_ss, torch_ss = ss.spawn(2)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(torch_ss.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1))
    return np.random.default_rng(np_ss), g


def subject_numpy_stream(seed: int, index: int) -> np.random.Generator:
    """The numpy stream of :func:`subject_streams` alone (no torch Generator to seed)."""
    return np.random.default_rng(subject_seedseq(seed, index).spawn(2)[0])
