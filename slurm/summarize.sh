#!/usr/bin/env bash
# slurm/summarize.sh — repgeo summarize as a Slurm batch job on CPU nodes: Dask workers on the MPI ranks.
#
#   sbatch --export=ALL,REPGEO_STORE=runs/acts.zarr,REPGEO_RESULTS=runs/results.zarr slurm/summarize.sh
#
#   REPGEO_STORE           --store: the activation store                                   (required)
#   REPGEO_RESULTS         --out: the results store                                        (required)
#   REPGEO_SUMMARIZE_ARGS  more summarize options, e.g. "--groupby language --reference eng"
#   REPGEO_MPI             srun's MPI plug-in: pmi2 for MPICH, pmix for Open MPI          [pmi2]
#   REPGEO                 the repgeo command                    [$SLURM_SUBMIT_DIR/.venv/bin/repgeo]
#
# Every rank is a one-thread Dask worker (rank 0 also runs the scheduler and the client), so --ntasks sets the
# parallelism. It resumes an existing results store (--resume), so a requeued or resubmitted job continues.
#SBATCH --job-name=repgeo-summarize
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

: "${REPGEO_STORE:?set REPGEO_STORE (sbatch --export=ALL,REPGEO_STORE=...)}"
: "${REPGEO_RESULTS:?set REPGEO_RESULTS}"
cd "${SLURM_SUBMIT_DIR:-.}"
REPGEO=${REPGEO:-$PWD/.venv/bin/repgeo}

echo "[summarize.sh] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks" >&2
# shellcheck disable=SC2086
srun --mpi="${REPGEO_MPI:-pmi2}" --kill-on-bad-exit=1 \
  "$REPGEO" summarize --store "$REPGEO_STORE" --out "$REPGEO_RESULTS" --scheduler mpi --resume \
  ${REPGEO_SUMMARIZE_ARGS:-}
