"""Ray Tune sweeps of the shared trainer (``trd-hpc tune``, ``trd-hpc bench tune``).

Specs are YAML files (packaged: ``trd_hpc/tasks/*/sweeps/``, shown in a checkout as ``tune/``)
checked by ``spec.load_spec``; ``sweep.run_sweep`` runs or resumes one; ``bench.run_bench``
compares the grid with ASHA.  Nothing is imported here (Ray only when a sweep runs).
"""
