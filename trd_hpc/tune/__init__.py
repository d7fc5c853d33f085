"""Ray Tune sweeps of the shared trainer (``trd-hpc tune``, ``trd-hpc bench tune``).

Specs are YAML files (``tune/*.yaml``) checked by :func:`load_spec`; :func:`run_sweep`
runs or resumes one; the CLI functions are :func:`add_tune_parser` / :func:`run_tune` and
:func:`add_bench_tune` / :func:`run_bench_tune`.  Ray is imported only when a sweep runs.
"""

from __future__ import annotations

from trd_hpc.tune.spec import Param, Sweep, SweepSpec, load_spec

__all__ = ["Param", "Sweep", "SweepSpec", "load_spec", "run_sweep", "add_tune_parser", "run_tune",
           "add_bench_tune", "run_bench_tune", "run_bench"]


def __getattr__(name: str):
    if name in ("run_sweep", "add_tune_parser", "run_tune"):
        from trd_hpc.tune import sweep

        return getattr(sweep, name)
    if name in ("add_bench_tune", "run_bench_tune", "run_bench"):
        from trd_hpc.tune import bench

        return getattr(bench, name)
    raise AttributeError(f"module 'trd_hpc.tune' has no attribute {name!r}")
