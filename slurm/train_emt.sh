#!/bin/bash
# Train the EMT (Enhanced Multimodal Transformer): one task per GPU (or per CPU slot) under srun,
# DDP when there is more than one task, requeued after a pre-emption checkpoint.
#
#   sbatch slurm/train_emt.sh [CONFIG] [--out DIR] [--no-eval] [KEY=VALUE ...]
#
# CONFIG defaults to configs/emt.yaml; --out to runs/<job name>-<job id> (a requeued job keeps its
# id, so it finds its run directory again). Every run is started with --resume auto.
# Override any #SBATCH line on the sbatch command line, e.g.
#   sbatch --partition=gpu --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8 \
#          --time=12:00:00 slurm/train_emt.sh configs/emt.yaml --out /scratch/$USER/emt
#   sbatch --ntasks=2 --cpus-per-task=1 slurm/train_emt.sh configs/emt_tiny.yaml     # CPU-only, 2 ranks
# (add --account, --qos, --mem, --gpus-per-node as your cluster needs: nothing here assumes any.)
# Several tasks imply train.strategy=ddp unless you pass train.strategy=deepspeed.
# Time limit or `scancel -s USR2 JOBID`: checkpoint, requeue, resume (see slurm/_train.sh).
#SBATCH --job-name=trd-train-emt
#SBATCH --nodes=1
# no --ntasks / --ntasks-per-node here: one task per node unless given on the command line
# (a default here would clash with the other one given there)
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
# sbatch runs a copy of this script: find the repository by TRD_HPC_ROOT or the submit directory.
source "${TRD_HPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_train.sh"

trd_train_main "$TRD_ROOT/configs/emt.yaml" "$@"
