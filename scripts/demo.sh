#!/usr/bin/env bash
# End-to-end demo on a small realistic dataset made from the MNI152 template nilearn ships:
# generate raw BIDS -> participant level (t1-linear + extraction) -> group level (split, train, predict).
# Usage: scripts/demo.sh [DEMO_DIR]   (run through `make demo`, which builds the pinned environment first)
set -euo pipefail
DEMO=${1:-demo}
BIDS=$DEMO/bids
OUT=$DEMO/bids/derivatives/bids_app
N_SUBJECTS=${N_SUBJECTS:-20}
NPROCS=${NPROCS:-2}
start=$SECONDS

rm -rf "$DEMO"
echo "== 1/4 generating $N_SUBJECTS participants (1 mm, regional atrophy in AD) in $BIDS"
bids_app-generate "$BIDS" --n-subjects "$N_SUBJECTS" --n-sessions 1 --preset realistic --seed 42 --effect-size 0.6

echo "== 2/4 participant level: t1-linear + image/slice/roi tensors ($NPROCS participants at a time)"
bids_app "$BIDS" "$OUT" participant --nprocs "$NPROCS" --omp-nthreads 1 --modes image slice roi \
  --roi-mask "hippocampus=$BIDS/code/template/roi-hippocampus_mask.nii.gz" --seed 42

echo "== 3/4 group level: subject-level split (4 folds + a held-out test set), a 3D CNN on the medial-temporal ROI"
bids_app "$BIDS" "$OUT" group --label diagnosis --task classification --mode roi \
  --architecture conv4_fc3 --epochs 40 --batch-size 8 --n-splits 4 --test-size 0.2 \
  --model-name demo_cnn --seed 42 --track mlflow

echo "== 4/4 validating the derivative dataset"
bids-validator-deno "$OUT" --ignoreWarnings >/dev/null && echo "bids-validator-deno: $OUT is valid"

maps=$OUT/models/demo_cnn
echo
echo "Done in $((SECONDS - start)) s."
echo "  derivative dataset : $OUT"
echo "  participant reports: $(ls "$OUT"/sub-*/sub-*_report.html | head -n 1) (one per participant)"
echo "  status table       : $OUT/participant_status.tsv"
echo "  model folder (MAPS): $maps"
echo "  group report       : $maps/report.html"
for group in validation test; do
  f=$maps/summary/${group}_best-loss_metrics_across_splits.tsv
  [ -f "$f" ] && { echo "  $group metrics over the 4 splits (mean, sd, per split): $f"; column -t "$f" | head -n 4; }
done
f=$maps/split-0/best-loss/test/test_image_level_metrics.tsv
if [ -f "$f" ]; then
  echo "  split 0 test metrics with n and 95 % CI, the linear baseline beside the network: $f"
  # columns by name: the metric TSVs carry more columns than fit a terminal (docs/maps.md)
  show="metric value ci_low ci_high baseline_value n_images n_participants positive_class training_status"
  awk -F'\t' -v OFS='\t' -v show="$show" '
    NR == 1 { n = split(show, want, " "); for (i = 1; i <= NF; i++) c[$i] = i }
    NR <= 4 { line = ""; for (k = 1; k <= n; k++) line = line (k > 1 ? OFS : "") (NR == 1 ? want[k] : $c[want[k]])
              print line }' "$f" | column -t
  warning=$(awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "warning") w = i } NR == 2 { print $w }' "$f")
  if [ -n "$warning" ] && [ "$warning" != "n/a" ]; then echo "  warning            : $warning"; fi
fi
echo "  run logs           : $OUT/logs/"
echo "  MLflow store       : $OUT/mlruns (browse with the full mlflow package: docs/tracking.md)"
