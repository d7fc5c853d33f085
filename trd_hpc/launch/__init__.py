"""Launchers around the trainer: ``trd-hpc submit`` (``submit``: submitit, SLURM, local, debug).
What every launch needs to know about its processes (threads, implied overrides) is
``trd_hpc.train.plan``, below the launchers.  Nothing is imported here.

The sbatch scripts live in ``slurm/``; both checkpoint on SIGUSR2 and requeue the job
(see ``trd_hpc.launch.submit`` and ``slurm/_train.sh``).
"""
