#!/usr/bin/env bash
# End-to-end demo on a small realistic dataset made from the MNI152 template nilearn ships:
# generate raw BIDS -> participant level (t1-linear + extraction) -> group level (split, train, predict).
# Usage: scripts/demo.sh [DEMO_DIR]   (run through `make demo`, which builds the pinned environment first)
set -euo pipefail
DEMO=${1:-demo}
BIDS=$DEMO/bids
OUT=$DEMO/bids/derivatives/bids_app
N_SUBJECTS=${N_SUBJECTS:-12}
NPROCS=${NPROCS:-2}
start=$SECONDS

rm -rf "$DEMO"
echo "== 1/4 generating $N_SUBJECTS participants (1 mm, regional atrophy in AD) in $BIDS"
bids_app-generate "$BIDS" --n-subjects "$N_SUBJECTS" --n-sessions 1 --preset realistic --seed 42 --effect-size 0.6

echo "== 2/4 participant level: t1-linear + image/slice/roi tensors ($NPROCS participants at a time)"
bids_app "$BIDS" "$OUT" participant --nprocs "$NPROCS" --omp-nthreads 1 --modes image slice roi \
  --roi-mask "hippocampus=$BIDS/code/template/roi-hippocampus_mask.nii.gz" --seed 42

echo "== 3/4 group level: subject-level split, then a 3D CNN on the medial-temporal ROI, test predictions"
bids_app "$BIDS" "$OUT" group --label diagnosis --task classification --mode roi \
  --architecture conv4_fc3 --epochs 40 --batch-size 4 --learning-rate 0.003 --n-splits 1 --test-size 0.25 \
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
for f in "$maps"/split-0/best-*/test/test_image_level_metrics.tsv; do
  [ -f "$f" ] && { echo "  test metrics       : $f"; column -t "$f" | head -n 6; }
done
echo "  run logs           : $OUT/logs/"
echo "  MLflow store       : $OUT/mlruns (browse with the full mlflow package: docs/tracking.md)"
