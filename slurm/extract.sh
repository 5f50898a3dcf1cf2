#!/usr/bin/env bash
# slurm/extract.sh — repgeo extract as a Slurm batch job on GPU nodes: one MPI rank per GPU.
#
# Submit from the project root (the checkout with .venv/), settings in environment variables:
#
#   sbatch --export=ALL,REPGEO_MODEL=smollm2-135m,REPGEO_PROMPTS=prompts.jsonl,REPGEO_STORE=runs/acts.zarr \
#          slurm/extract.sh
#
#   REPGEO_MODEL         --model: HF directory, .gguf file, cached hub id or alias          (required)
#   REPGEO_PROMPTS       --prompts: JSONL, .txt, directory or glob                          (required)
#   REPGEO_STORE         --out: the activation store                                        (required)
#   REPGEO_EXTRACT_ARGS  more extract options, e.g. "--max-tokens 1024 --min-tokens 1024 --dtype bfloat16"
#   REPGEO_MPI           srun's MPI plug-in: pmi2 for MPICH (the default install), pmix for Open MPI  [pmi2]
#   REPGEO_SRUN_ARGS     more srun options, e.g. "--gpus-per-task=1" to give every rank only its own GPU
#   REPGEO               the repgeo command                              [$SLURM_SUBMIT_DIR/.venv/bin/repgeo]
#
# sbatch's own options override the defaults below as usual: --nodes=2, --ntasks-per-node=8,
# --gpus-per-node=0 (CPU-only nodes), --time, --partition, --account. For a model too large for one GPU use one
# rank per node spanning its GPUs: --ntasks-per-node=1 and REPGEO_EXTRACT_ARGS="--device-map auto".
#
# Time limits and preemption: 5 minutes before the limit Slurm sends SIGUSR1 to the ranks (and preemption sends
# SIGTERM); they finish the batch they are on, never mark a half-written prompt done, and exit. The job then
# requeues itself and the next run resumes (--resume is always passed). Logs: slurm-repgeo-extract-JOBID.out,
# appended across requeues.
#SBATCH --job-name=repgeo-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

: "${REPGEO_MODEL:?set REPGEO_MODEL (sbatch --export=ALL,REPGEO_MODEL=...)}"
: "${REPGEO_PROMPTS:?set REPGEO_PROMPTS}"
: "${REPGEO_STORE:?set REPGEO_STORE}"
cd "${SLURM_SUBMIT_DIR:-.}"
REPGEO=${REPGEO:-$PWD/.venv/bin/repgeo}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

echo "[extract.sh] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks" >&2
# The ranks' stderr also goes to a file, read below to tell a clean stop from a failure.
ranks_log=$(mktemp) || exit 1
trap 'rm -f "$ranks_log"' EXIT
exec 3>&1
# shellcheck disable=SC2086  # the *_ARGS variables are lists of options
srun --mpi="${REPGEO_MPI:-pmi2}" --kill-on-bad-exit=1 ${REPGEO_SRUN_ARGS:-} \
  "$REPGEO" extract --model "$REPGEO_MODEL" --prompts "$REPGEO_PROMPTS" --out "$REPGEO_STORE" --resume \
  ${REPGEO_EXTRACT_ARGS:-} 2>&1 >&3 3>&- | tee "$ranks_log" >&2 3>&-
rc=${PIPESTATUS[0]}
# 138 = stopped by SIGUSR1 (the time-limit warning), 143 = by SIGTERM: come back and resume. But 143 is also what
# srun returns when one rank fails and --kill-on-bad-exit terminates the others (SIGTERM): only a stop that every
# rank agreed on makes rank 0 print "extract: stopped by SIG...".
if [ "$rc" -eq 138 ] || { [ "$rc" -eq 143 ] && grep -q "^extract: stopped by SIG" "$ranks_log"; }; then
  echo "[extract.sh] stopped before the end (exit $rc); requeueing job $SLURM_JOB_ID to resume" >&2
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$rc"
