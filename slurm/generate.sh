#!/bin/bash
# Write a cohort with one SLURM array task per shard; the task that completes
# the last shard writes manifest.json (or run `trd-hpc generate CONFIG --out DIR --finalize`).
#
#   sbatch --array=0-15 slurm/generate.sh configs/emt.yaml /scratch/$USER/emt cohort.n_subjects=20000
#
# The number of shards is the size of the array; override any #SBATCH line on the
# sbatch command line (--array, --time, --partition, --output, --cpus-per-task, ...).
#SBATCH --job-name=trd-generate
#SBATCH --array=0-3
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=2G
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
# sbatch runs a copy of this script: find the repository by TRD_HPC_ROOT or the submit directory.
source "${TRD_HPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_common.sh"

CONFIG="${1:?usage: sbatch --array=0-N slurm/generate.sh CONFIG OUT_DIR [KEY=VALUE ...]}"
OUT="${2:?usage: sbatch --array=0-N slurm/generate.sh CONFIG OUT_DIR [KEY=VALUE ...]}"
shift 2
array_shard

echo "task ${SLURM_ARRAY_TASK_ID}: shard ${SHARD} of ${NUM_SHARDS} -> ${OUT}"
$TRD_HPC generate "$CONFIG" --out "$OUT" --num-shards "$NUM_SHARDS" --shard-index "$SHARD" --quiet "$@"
