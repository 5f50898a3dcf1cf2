#!/usr/bin/env bash
# slurm/pipeline.sh — submit extract, then summarize once extract has succeeded (afterok); print both job ids.
#
#   REPGEO_MODEL=... REPGEO_PROMPTS=... REPGEO_STORE=... REPGEO_RESULTS=... slurm/pipeline.sh [sbatch options]
#
# The REPGEO_* variables are those of slurm/extract.sh and slurm/summarize.sh. Extra arguments go to both
# sbatch calls (e.g. --partition=... --account=...); per-job options via REPGEO_EXTRACT_SBATCH and
# REPGEO_SUMMARIZE_SBATCH (e.g. REPGEO_EXTRACT_SBATCH="--gpus-per-node=0 --ntasks-per-node=2" on CPU nodes).
# Run it from the project root. Prints "extract JOBID" and "summarize JOBID".
set -euo pipefail
: "${REPGEO_MODEL:?}" "${REPGEO_PROMPTS:?}" "${REPGEO_STORE:?}" "${REPGEO_RESULTS:?}"
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC2086
extract=$(sbatch --parsable --export=ALL "$@" ${REPGEO_EXTRACT_SBATCH:-} "$here/extract.sh")
extract=${extract%%;*}
# shellcheck disable=SC2086
summarize=$(sbatch --parsable --export=ALL --dependency="afterok:$extract" --kill-on-invalid-dep=yes "$@" \
  ${REPGEO_SUMMARIZE_SBATCH:-} "$here/summarize.sh")
summarize=${summarize%%;*}
echo "extract $extract"
echo "summarize $summarize"
