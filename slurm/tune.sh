#!/bin/bash
# A Ray cluster inside one SLURM allocation, then a sweep driven from the first node:
# the Ray head on the first node, one Ray worker on each other node (one task per node,
# each offering its CPUs, and its GPUs when the job has some, to Ray Tune).
#
#   sbatch --nodes=4 --cpus-per-task=32 slurm/tune.sh tune/cnn3d_asha.yaml /scratch/$USER/tune-asha
#   sbatch --nodes=2 --cpus-per-task=16 --gpus-per-node=4 slurm/tune.sh tune/cnn3d_grid.yaml /scratch/$USER/grid \
#       --max-t 20 data.cohort=/scratch/$USER/cnn3d
#
# Arguments after SPEC OUT_DIR go to `trd-hpc tune` (options and KEY=VALUE overrides).
# OUT_DIR and the cohort (data.cohort) must be on a filesystem every node sees.
# Submitting the same command again (e.g. after the time limit) resumes the sweep.
# Environment: RAY_AUTH_MODE (default token; the same mode and token reach head, workers
# and driver), RAY_HEAD_IP (default: the first node's address), RAY_PORT (default derived from the job id), RAY_OBJECT_STORE_BYTES (per node;
# default: Ray's), RAY (the ray command; default: next to trd-hpc, else on PATH).
# Override any #SBATCH line on the sbatch command line (--nodes, --time, --partition, ...).
#SBATCH --job-name=trd-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --mem-per-cpu=2G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this script: find the repository by TRD_HPC_ROOT or the submit directory.
source "${TRD_HPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_common.sh"

USAGE="usage: sbatch [--nodes=N] slurm/tune.sh SPEC OUT_DIR [trd-hpc tune options] [KEY=VALUE ...]"
SPEC="${1:?$USAGE}"
OUT="${2:?$USAGE}"
shift 2
: "${SLURM_JOB_ID:?run this script with sbatch}"

if [[ -z "${RAY:-}" ]]; then
  RAY="$(dirname "$(command -v "${TRD_HPC%% *}")")/ray"
  [[ -x "$RAY" ]] || RAY=ray
fi
command -v "$RAY" >/dev/null || { echo "ray not found: pip install 'trd-hpc[tune]' or set RAY" >&2; exit 127; }

# Ray turns token authentication on by default: every process must agree on the mode and
# hold the same token. srun passes the environment on to every node.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Trials at normal priority: Ray's default worker niceness (15) starves them next to any other process.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  RAY_AUTH_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export RAY_AUTH_TOKEN
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD="${NODES[0]}"
# The head's address as the other nodes reach it (not a loopback address from /etc/hosts).
HEAD_IP="${RAY_HEAD_IP:-$(srun --nodes=1 --ntasks=1 -w "$HEAD" bash -c \
  'ip=$(hostname --ip-address | awk "{print \$1}"); case "$ip" in 127.*|"") ip=$(hostname -I | awk "{print \$1}");; esac; echo "$ip"')}"
PORT="${RAY_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}"
CPUS="${SLURM_CPUS_PER_TASK:-1}"
EXTRA=()
[[ -n "${RAY_OBJECT_STORE_BYTES:-}" ]] && EXTRA+=(--object-store-memory="$RAY_OBJECT_STORE_BYTES")
# The driver connects to this job's head, never to another job's Ray on a shared node.
export RAY_ADDRESS="$HEAD_IP:$PORT"

cleanup() {
  # Stops the srun steps (and the Ray processes they started); the job's end would too.
  local pids
  pids="$(jobs -p)"
  [[ -n "$pids" ]] && kill $pids 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "ray head on $HEAD ($RAY_ADDRESS), workers on ${NODES[*]:1}; $CPUS CPUs per node; auth $RAY_AUTH_MODE"
srun --nodes=1 --ntasks=1 -w "$HEAD" \
  "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus="$CPUS" \
  --include-dashboard=false --disable-usage-stats "${EXTRA[@]}" --block &

for _ in $(seq 120); do
  "$RAY" status --address="$RAY_ADDRESS" >/dev/null 2>&1 && break
  sleep 1
done
"$RAY" status --address="$RAY_ADDRESS" >/dev/null || { echo "the Ray head did not come up at $RAY_ADDRESS" >&2; exit 1; }

for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    "$RAY" start --address="$RAY_ADDRESS" --num-cpus="$CPUS" --disable-usage-stats "${EXTRA[@]}" --block &
done

# --min-nodes: the first trials wait for every worker, rather than all landing on the head
$TRD_HPC tune "$SPEC" --out "$OUT" --address auto --min-nodes "${#NODES[@]}" "$@"
