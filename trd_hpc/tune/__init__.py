"""Ray Tune sweeps of the shared trainer (``trd-hpc tune``, ``trd-hpc bench tune``).

Specs are YAML files (``tune/*.yaml``) checked by :func:`load_spec`; :func:`run_sweep`
runs or resumes one; :func:`run_bench` compares the grid with ASHA.  Ray is imported
only when a sweep runs.
"""

from __future__ import annotations

from trd_hpc.tune.spec import Param, Sweep, SweepSpec, load_spec

__all__ = ["Param", "Sweep", "SweepSpec", "load_spec", "run_sweep", "run_bench"]


def __getattr__(name: str):
    if name == "run_sweep":
        from trd_hpc.tune import sweep

        return sweep.run_sweep
    if name == "run_bench":
        from trd_hpc.tune import bench

        return bench.run_bench
    raise AttributeError(f"module 'trd_hpc.tune' has no attribute {name!r}")
