#!/bin/bash
# The GPU check, `trd-hpc bench gpu`, on one GPU: the EMT and the 3-D CNN at the papers' shapes in
# bf16, fp16 (GradScaler) and fp32, the HDF5 loader against batches kept on the device, MFU,
# DeepSpeed ZeRO-1/2 in one process and an exact resume after a kill, all in one JSON; sized to
# finish in under 8 minutes.
#
#   sbatch slurm/bench_gpu.sh [--json FILE] [--dir SCRATCH]
#
# --json defaults to bench_gpu-<job id>.json in the submit directory; the scratch cohorts (~3.8 GB)
# go to $TMPDIR (node-local on most clusters) unless --dir names another place.
# Override any #SBATCH line on the sbatch command line (--partition, --account, --gres=gpu:a100:1 ...).
#SBATCH --job-name=trd-bench-gpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
# the cohorts' page cache counts against the job's memory on many clusters
#SBATCH --mem=32G
#SBATCH --time=00:15:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this script: find the repository by TRD_HPC_ROOT or the submit directory.
source "${TRD_HPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_common.sh"

args=("$@")
has_json=0
for a in "$@"; do [[ "$a" == --json || "$a" == --json=* ]] && has_json=1; done
(( has_json )) || args+=(--json "bench_gpu-${SLURM_JOB_ID:-local}.json")
# --device cuda: a node without a visible GPU is an error, not a CPU-mode run that could pass for one
$TRD_HPC bench gpu --device cuda "${args[@]}"
