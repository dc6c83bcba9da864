#!/usr/bin/env bash
# The whole pipeline on SLURM: one array task per participant, then the group job once all succeeded.
#   BIDS_DIR=/data/bids OUTPUT_DIR=/data/out IMAGE=bids_app.sif CONFIG=train.toml bash submit.sh [--multigpu]
# participants.txt is written from BIDS_DIR's sub-* folders unless it exists. Both jobs read the same variables.
set -euo pipefail

here=$(dirname "$(realpath "$0")")
export BIDS_DIR=${BIDS_DIR:-/data/bids}
export LABELS=${LABELS:-participants.txt}
group_script=$here/group.sbatch
if [[ ${1:-} == --multigpu ]]; then
  group_script=$here/group_multigpu.sbatch
fi

if [[ ! -s $LABELS ]]; then
  find "$BIDS_DIR" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' | sed 's/^sub-//' | sort > "$LABELS"
fi
n=$(grep -c . "$LABELS" || true)
if (( n == 0 )); then
  echo "No participant in $LABELS (and no sub-* folder in $BIDS_DIR)." >&2
  exit 66
fi
mkdir -p logs
array_id=$(sbatch --parsable --array="1-$n%${MAX_TASKS:-50}" "$here/participant_array.sbatch")
group_id=$(sbatch --parsable --dependency="afterok:${array_id%%;*}" "$group_script")
echo "participant array $array_id ($n task(s)); group job $group_id starts when every task succeeded"
