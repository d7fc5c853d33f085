# Sourced (not run) by slurm/train_emt.sh, slurm/train_cnn3d.sh and slurm/cv_cnn3d.sh:
# the srun launch of the training tasks and the requeue after a pre-emption checkpoint.
#
# Pre-emption and requeue, end to end:
#  1. `#SBATCH --signal=USR2@120` (no `B:`) makes SLURM send SIGUSR2 to the job *steps*, i.e. to
#     every python task started by srun, 120 s before the time limit; `scancel -s USR2 JOBID`
#     does the same at any time.  (USR2, not USR1: NCCL catches USR1.)
#  2. Each task's handler only sets a flag (trd_hpc/train/signals.py); at the next step boundary the
#     ranks agree, rank 0 writes a checkpoint and RUN_DIR/PREEMPTED, every task exits 0.
#  3. srun returns; this shell sees RUN_DIR/PREEMPTED and runs `scontrol requeue $SLURM_JOB_ID`.
#     The job keeps its id, so the default --out is the same directory, and the new run starts
#     with `--resume auto` from the newest checkpoint (a fresh run simply starts).
# A signal sent to the batch shell only (`--signal=B:USR2@T`, `scancel --batch -s USR2`) is
# forwarded to srun, which passes it to the tasks. SIGTERM (scancel, pre-emption by the scheduler)
# is not trapped: the tasks still checkpoint if they can, but this shell does not requeue; with
# PreemptMode=REQUEUE SLURM requeues the job itself.

TRD_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRD_ROOT="$(dirname "$TRD_SLURM_DIR")"
# TRD_HPC, OMP_NUM_THREADS, WANDB_MODE; cd to the submit directory
source "$TRD_SLURM_DIR/_common.sh"
export PYTHONUNBUFFERED=1

# Ranks, rendezvous (the job's first host, a port from the job id), "several tasks -> DDP" and
# "torch threads = CPUs per task" are trd_hpc/train/plan.py's, applied by `trd-hpc train`/`cv`
# in each task.  Only torchrun-style variables inherited from the submitting shell are dropped
# here: they would take precedence over SLURM's in the tasks.
trd_rendezvous() {
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
}

# srun "$@" with one task per allocated slot (sbatch's --nodes x --ntasks-per-node), run in the
# background so that this shell can forward SIGUSR2 to it; returns srun's exit status.
# --cpus-per-task is passed on explicitly: srun 22.05 does not inherit it from sbatch.
trd_srun() {
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$@" &
  local pid=$! rc=0
  trap "kill -USR2 $pid 2>/dev/null || true" USR2
  wait "$pid" || rc=$?
  # a trapped signal interrupts `wait` (status > 128) while srun still runs: wait again
  while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
  trap - USR2
  return "$rc"
}

# Requeue this job if the run in $1 was pre-empted during this attempt (the caller removes a stale
# PREEMPTED before srun). At most TRD_MAX_REQUEUES (default 50) restarts, against a loop.
# Returns 0 when the job was requeued.
trd_requeue_if_preempted() {
  local run_dir="$1" restarts="${SLURM_RESTART_COUNT:-0}" max="${TRD_MAX_REQUEUES:-50}"
  [[ -f "$run_dir/PREEMPTED" ]] || return 1
  if (( restarts >= max )); then
    echo "pre-empted again after ${restarts} restarts (TRD_MAX_REQUEUES=${max}): not requeuing;" \
         "submit the same command again to continue from ${run_dir}" >&2
    return 1
  fi
  echo "$(date '+%F %T') pre-empted ($(cat "$run_dir/PREEMPTED")): requeueing job ${SLURM_JOB_ID}" \
       "(restart $(( restarts + 1 )))"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "scontrol requeue ${SLURM_JOB_ID} failed: submit the same command again to continue from ${run_dir}" >&2
    return 1
  fi
}

# Split "[CONFIG] [--out DIR] [ARGS...]": sets TRD_CONFIG (default $1), TRD_OUT (may stay empty),
# TRD_ARGS (the rest, passed on as they are).
# --resume [auto] is accepted and dropped: these scripts always resume from the newest checkpoint.
trd_parse_args() {
  TRD_CONFIG="$1"; shift
  TRD_OUT="" TRD_ARGS=()
  if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then TRD_CONFIG="$1"; shift; fi
  while (( $# )); do
    case "$1" in
      --out) TRD_OUT="${2:?--out needs a directory}"; shift 2 ;;
      --out=*) TRD_OUT="${1#--out=}"; shift ;;
      --resume|--resume=auto) shift; if [[ "${1:-}" == auto ]]; then shift; fi ;;
      --resume=*) echo "--resume: these scripts always resume from the newest checkpoint in --out (--resume auto)" >&2; exit 2 ;;
      *) TRD_ARGS+=("$1"); shift ;;
    esac
  done
}

# Tasks srun will start: --ntasks, else one per node (SLURM leaves SLURM_NTASKS unset then).
trd_ntasks() { echo "${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-1}}"; }

trd_banner() {
  echo "$(date '+%F %T') job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
       "$(trd_ntasks) task(s) x ${SLURM_CPUS_PER_TASK:-1} CPU(s)"
}

# The body of train_emt.sh / train_cnn3d.sh: trd_train_main DEFAULT_CONFIG "$@"
trd_train_main() {
  trd_parse_args "$@"
  local out="${TRD_OUT:-runs/${SLURM_JOB_NAME:-trd-train}-${SLURM_JOB_ID}}" rc=0
  trd_rendezvous
  trd_banner
  echo "train ${TRD_CONFIG} -> ${out} ${TRD_ARGS[*]}"
  mkdir -p "$out"
  rm -f "$out/PREEMPTED"  # only a PREEMPTED written by this attempt requeues the job
  trd_srun $TRD_HPC train "$TRD_CONFIG" --out "$out" --resume auto --quiet "${TRD_ARGS[@]}" || rc=$?
  if trd_requeue_if_preempted "$out"; then exit 0; fi
  if [[ -f "$out/PREEMPTED" ]]; then exit 1; fi  # pre-empted but not requeued
  exit "$rc"
}
