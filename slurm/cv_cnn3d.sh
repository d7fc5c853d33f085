#!/bin/bash
# k-fold cross-validation of the dual-path 3-D CNN: one array task per fold (task id = fold).
#
#   sbatch --array=0-4 slurm/cv_cnn3d.sh [CONFIG] [--out DIR] [--folds K] [KEY=VALUE ...]
#   sbatch --array=2,4 slurm/cv_cnn3d.sh [CONFIG] --out DIR          # redo folds 2 and 4 only
#   sbatch --dependency=afterok:<array job id> --cpus-per-task=1 slurm/cv_cnn3d.sh [CONFIG] --out DIR --aggregate
#
# Task F runs `trd-hpc cv CONFIG --out DIR --fold F` into DIR/fold-F; the task that finishes the
# last fold also writes DIR/cv_summary.json (mean and sd of every metric), so the --aggregate job
# (not an array: there is no default --array here) is only needed to redo the summary, e.g. after
# rerunning some folds. --array is 0..K-1 with K = the config's cohort.split.folds (5 in
# configs/cnn3d.yaml; --folds K must equal it). CONFIG defaults to configs/cnn3d.yaml, --out to
# runs/<job name>-<array job id> (give --out to the --aggregate job). Each fold may itself use
# several DDP tasks (--ntasks=N).
# A time limit or `scancel -s USR2 <job id>_<task id>` checkpoints the fold and requeues that task,
# which resumes it (see slurm/_train.sh). Override any #SBATCH line on the sbatch command line.
#SBATCH --job-name=trd-cv-cnn3d
#SBATCH --nodes=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
# sbatch runs a copy of this script: find the repository by TRD_HPC_ROOT or the submit directory.
source "${TRD_HPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_train.sh"

trd_parse_args "$TRD_ROOT/configs/cnn3d.yaml" "$@"
AGGREGATE=0
CV_ARGS=()    # options of `trd-hpc cv` itself
OVERRIDES=()
set -- "${TRD_ARGS[@]}"
while (( $# )); do
  case "$1" in
    --aggregate) AGGREGATE=1; shift ;;
    --folds) CV_ARGS+=(--folds "${2:?--folds needs a number}"); shift 2 ;;
    --folds=*) CV_ARGS+=(--folds "${1#--folds=}"); shift ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
OUT="${TRD_OUT:-runs/${SLURM_JOB_NAME:-trd-cv}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"

if (( AGGREGATE )); then
  echo "aggregate the folds of ${OUT}"
  exec $TRD_HPC cv "$TRD_CONFIG" --out "$OUT" --aggregate "${CV_ARGS[@]}" "${OVERRIDES[@]}"
fi

FOLD="${SLURM_ARRAY_TASK_ID:?run this script as an array job, one task per fold (sbatch --array=0-4 ...), or with --aggregate}"
trd_rendezvous
trd_banner
echo "cv fold ${FOLD}: ${TRD_CONFIG} -> ${OUT}/fold-${FOLD} ${OVERRIDES[*]}"
mkdir -p "$OUT/fold-$FOLD"
rm -f "$OUT/fold-$FOLD/PREEMPTED"  # only a PREEMPTED written by this attempt requeues the task
rc=0
# `trd-hpc cv` resumes the fold from its newest checkpoint by itself
trd_srun $TRD_HPC cv "$TRD_CONFIG" --out "$OUT" --fold "$FOLD" --quiet "${CV_ARGS[@]}" "${OVERRIDES[@]}" || rc=$?
if trd_requeue_if_preempted "$OUT/fold-$FOLD"; then exit 0; fi
if [[ -f "$OUT/fold-$FOLD/PREEMPTED" ]]; then exit 1; fi  # pre-empted but not requeued
exit "$rc"
