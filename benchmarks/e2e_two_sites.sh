#!/usr/bin/env bash
# A held-out site end to end on realistic generated data (1 mm, t1-linear from raw):
#   site 1 (seed 42, atrophy 0.6) -> participant level -> group level (k-fold CNN on the ROI + linear baseline);
#   site 2 (another seed, so other participants and acquisition draws; atrophy 0.4) -> participant level with
#   --from-model (no preprocessing option re-typed) -> prediction with the leak checks.
# Prints the wall time of each step and site 2's balanced accuracy with its interval and n, network and baseline.
# Usage: benchmarks/e2e_two_sites.sh [WORK_DIR]   (environment: N1, N2 participants; NPROCS; EPOCHS)
set -euo pipefail
WORK=${1:-/tmp/bids_app_two_sites}
N1=${N1:-20}
N2=${N2:-12}
NPROCS=${NPROCS:-2}
EPOCHS=${EPOCHS:-20}
S1=$WORK/site1
S2=$WORK/site2
O1=$S1/derivatives/bids_app
O2=$S2/derivatives/bids_app
rm -rf "$WORK"
mkdir -p "$WORK"

step() {  # step NAME COMMAND...: run and print its wall time
  local name=$1 start=$SECONDS
  shift
  "$@" > "$WORK/$name.log" 2>&1 || { tail -n 20 "$WORK/$name.log"; exit 1; }
  printf '%-34s %5d s\n' "$name" $((SECONDS - start))
}

step generate-site1 bids_app-generate "$S1" --n-subjects "$N1" --preset realistic --seed 42 --effect-size 0.6
step generate-site2 bids_app-generate "$S2" --n-subjects "$N2" --preset realistic --seed 7 --effect-size 0.4
step participant-site1 bids_app "$S1" "$O1" participant --nprocs "$NPROCS" --omp-nthreads 1 --modes roi \
  --roi-mask "hippocampus=$S1/code/template/roi-hippocampus_mask.nii.gz" --seed 42
step group-site1 bids_app "$S1" "$O1" group --label diagnosis --task classification --mode roi \
  --architecture conv4_fc3 --epochs "$EPOCHS" --n-splits 4 --test-size 0.2 --model-name cnn --seed 42
step participant-site2-from-model bids_app "$S2" "$O2" participant --nprocs "$NPROCS" --omp-nthreads 1 \
  --from-model "$O1/models/cnn"
step predict-site2 bids_app "$S1" "$O1" group --stages predict --model-name cnn --predict-from "$O2" \
  --group-name site2

echo
echo "Site 2 (n = $N2 participants, never seen in training), balanced accuracy per split [95 % CI]:"
for f in "$O1"/models/cnn/split-*/best-loss/site2/site2_image_level_metrics.tsv; do
  split=$(basename "$(dirname "$(dirname "$(dirname "$f")")")")
  awk -F'\t' -v sp="$split" 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i }
    $c["metric"] == "balanced_accuracy" {
      printf "  %s  network %s [%s, %s]  baseline %s [%s, %s]  n_images %s  n_participants %s  %s\n", sp,
        $c["value"], $c["ci_low"], $c["ci_high"], $c["baseline_value"], $c["baseline_ci_low"],
        $c["baseline_ci_high"], $c["n_images"], $c["n_participants"], $c["training_status"] }' "$f"
done
report=$(ls "$O1"/models/cnn/split-0/best-loss/site2/leak_report.json)
echo "Leak report: $report"
python3 - "$report" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print("  refused:", report.get("Refused"), "| leaks:", len(report.get("Leaks", [])),
      "| same labels in another dataset (information):", len((report.get("SameLabelOtherDataset") or {}).get("Pairs", [])))
EOF
