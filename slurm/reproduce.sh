#!/usr/bin/env bash
# slurm/reproduce.sh — repgeo reproduce STUDY as Slurm jobs: this job extracts on the GPU partition (one MPI rank
# per GPU) and, on its first start, submits the analysis job (summarize, SAE, findings, report) on CPU nodes with
# a dependency on it (afterok), as slurm/pipeline.sh chains extract and summarize.
#
#   sbatch --export=ALL,REPGEO_STUDY=token-geometry,REPGEO_OUT=runs/token-geometry slurm/reproduce.sh
#
#   REPGEO_STUDY            the study: token-geometry, languages, concepts or models                     (required)
#   REPGEO_OUT              --out: the study's directory                            [reproduce-$REPGEO_STUDY]
#   REPGEO_MODEL            --model (the models study: a comma-separated list)         [the study's default]
#   REPGEO_CORPUS           --corpus: your prompt file with the labels the study needs   [the bundled corpus]
#   REPGEO_SCALE            --scale: tiny, small or full                                               [small]
#   REPGEO_REPRODUCE_ARGS   more reproduce options, e.g. "--min-tokens 2048"
#   REPGEO_ANALYZE_SBATCH   more sbatch options of the analysis job, after its defaults --gpus-per-node=0
#                           --ntasks-per-node=4 --cpus-per-task=1 (its ranks are the Dask workers)
#   REPGEO_MPI              srun's MPI plug-in: pmi2 for MPICH, pmix for Open MPI                       [pmi2]
#   REPGEO_SRUN_ARGS        more srun options of the extraction, e.g. "--gpus-per-task=1"
#   REPGEO                  the repgeo command                       [$SLURM_SUBMIT_DIR/.venv/bin/repgeo]
#
# Both jobs rerun `repgeo reproduce` on the same directory, which continues where it stopped: a complete stage is
# skipped, so a requeued, resubmitted or repeated job never redoes finished work. Like slurm/extract.sh, the
# extraction job requeues itself when stopped by the time limit (SIGUSR1) or preemption. Prints "analyze JOBID".
# Logs: slurm-repgeo-reproduce-JOBID.out (extraction) and slurm-repgeo-analyze-JOBID.out.
#SBATCH --job-name=repgeo-reproduce
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

: "${REPGEO_STUDY:?set REPGEO_STUDY (sbatch --export=ALL,REPGEO_STUDY=token-geometry ...)}"
cd "${SLURM_SUBMIT_DIR:-.}"
REPGEO=${REPGEO:-$PWD/.venv/bin/repgeo}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
here=${SLURM_SUBMIT_DIR:-.}/slurm
args=(reproduce "$REPGEO_STUDY" --out "${REPGEO_OUT:-reproduce-$REPGEO_STUDY}" --scale "${REPGEO_SCALE:-small}")
[ -n "${REPGEO_MODEL:-}" ] && args+=(--model "$REPGEO_MODEL")
[ -n "${REPGEO_CORPUS:-}" ] && args+=(--corpus "$REPGEO_CORPUS")
# shellcheck disable=SC2206  # a list of options
args+=(${REPGEO_REPRODUCE_ARGS:-})

if [ "${REPGEO_PHASE:-extract}" = analyze ]; then
  echo "[reproduce.sh] analysis job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks" >&2
  # shellcheck disable=SC2086
  exec srun --mpi="${REPGEO_MPI:-pmi2}" --kill-on-bad-exit=1 "$REPGEO" "${args[@]}" --phase analyze --scheduler mpi
fi

if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then  # the first start, not a requeue: chain the analysis job
  # shellcheck disable=SC2086
  analyze=$(sbatch --parsable --export=ALL,REPGEO_PHASE=analyze --job-name=repgeo-analyze \
    --dependency="afterok:${SLURM_JOB_ID:?run this script with sbatch}" --kill-on-invalid-dep=yes \
    --gpus-per-node=0 --ntasks-per-node=4 --cpus-per-task=1 --output="slurm-%x-%j.out" \
    ${REPGEO_ANALYZE_SBATCH:-} "$here/reproduce.sh") || exit 1
  echo "analyze ${analyze%%;*}"
fi
echo "[reproduce.sh] extraction job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS:-?} tasks" >&2
ranks_log=$(mktemp) || exit 1
trap 'rm -f "$ranks_log"' EXIT
exec 3>&1
# shellcheck disable=SC2086
srun --mpi="${REPGEO_MPI:-pmi2}" --kill-on-bad-exit=1 ${REPGEO_SRUN_ARGS:-} \
  "$REPGEO" "${args[@]}" --phase extract 2>&1 >&3 3>&- | tee "$ranks_log" >&2 3>&-
rc=${PIPESTATUS[0]}
# As slurm/extract.sh: a stop every rank agreed on (the time-limit warning or preemption) requeues and resumes.
if [ "$rc" -eq 138 ] || { [ "$rc" -eq 143 ] && grep -q "^extract: stopped by SIG" "$ranks_log"; }; then
  echo "[reproduce.sh] stopped before the end (exit $rc); requeueing job $SLURM_JOB_ID to resume" >&2
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$rc"
