"""Launchers around the trainer: ``trd-hpc submit`` (submitit: SLURM, local, debug).

The sbatch scripts live in ``slurm/``; both checkpoint on SIGUSR2 and requeue the job
(see ``trd_hpc.launch.submit`` and ``slurm/_train.sh``).
"""

from trd_hpc.launch.submit import SubmitRequest, submit

__all__ = ["SubmitRequest", "TrdJob", "submit"]


def __getattr__(name: str):
    if name == "TrdJob":  # imports submitit (see trd_hpc.launch.submit)
        from trd_hpc.launch import submit as _submit

        return _submit.TrdJob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
