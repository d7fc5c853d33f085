# Sourced by the sbatch scripts: find the trd-hpc command and set up the environment.
# TRD_HPC: the command to run (default: the submit directory's .venv, else `trd-hpc` on PATH).
cd "${SLURM_SUBMIT_DIR:-$PWD}"
if [[ -z "${TRD_HPC:-}" ]]; then
  if [[ -x .venv/bin/trd-hpc ]]; then TRD_HPC="$PWD/.venv/bin/trd-hpc"; else TRD_HPC=trd-hpc; fi
fi
command -v "${TRD_HPC%% *}" >/dev/null || { echo "trd-hpc not found: activate its environment or set TRD_HPC" >&2; exit 127; }
# One thread per allocated CPU for torch in every task.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# W&B offline unless the user asked otherwise (compute nodes often have no network).
export WANDB_MODE="${WANDB_MODE:-offline}"
# An array job's part (generate.sh, ingest.sh): NUM_SHARDS = the array's size, SHARD = this
# task's index counted from 0.
array_shard() {
  : "${SLURM_ARRAY_TASK_ID:?run this script as an array job (sbatch --array=0-N)}"
  NUM_SHARDS="${SLURM_ARRAY_TASK_COUNT:-$(( SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1 ))}"
  SHARD=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} ))
}
