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
