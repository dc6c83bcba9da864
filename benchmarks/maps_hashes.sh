#!/usr/bin/env bash
# Seeded tiny participant + group runs, then the sha256 of every prediction/metric TSV and model weight file.
# Used to show that a refactoring changes no output byte: run it before and after, diff the two listings.
# Usage: benchmarks/maps_hashes.sh WORK_DIR > hashes.txt   (needs the project's environment on PATH)
set -euo pipefail
WORK=${1:?usage: maps_hashes.sh WORK_DIR}
rm -rf "$WORK" && mkdir -p "$WORK"
BIDS=$WORK/bids
OUT=$WORK/out
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1
bids_app-generate "$BIDS" --n-subjects 12 --n-sessions 1 --preset tiny --seed 7 --effect-size 0.7 \
  --preprocessed derivative >/dev/null
common=(--seed 5 --batch-size 2 --epochs 2 --n-splits 2 --test-size 3 --n-bootstrap 50)
bids_app "$BIDS" "$OUT" participant -d "$BIDS/derivatives/preproc" --template "$BIDS/code/template/tpl-MNI152NLin2009aSym_res-4mm_T1w.nii.gz" \
  --crop-shape 40 48 40 --modes image slice roi --discarded-slices 4 \
  --roi-mask "hippocampus=$BIDS/code/template/roi-hippocampus_mask.nii.gz" --seed 5 >>"$WORK/log.txt" 2>&1
bids_app "$BIDS" "$OUT" group --label diagnosis --mode roi --architecture small_cnn --model-name roi_cls \
  "${common[@]}" >>"$WORK/log.txt" 2>&1
bids_app "$BIDS" "$OUT" group --label diagnosis --mode slice --architecture small_cnn --model-name slice_cls \
  --selection-metrics loss balanced_accuracy "${common[@]}" >>"$WORK/log.txt" 2>&1
bids_app "$BIDS" "$OUT" group --label age --task regression --mode image --architecture small_cnn \
  --model-name image_reg "${common[@]}" >>"$WORK/log.txt" 2>&1
bids_app "$BIDS" "$OUT" group --label diagnosis --task reconstruction --mode roi --architecture small_autoencoder \
  --model-name roi_rec "${common[@]}" >>"$WORK/log.txt" 2>&1
cd "$OUT/models"
find . \( -name '*.tsv' -path '*/best-*' -o -name '*.safetensors' -o -name 'splits.json' -o -name 'training.tsv' \) \
  -print0 | sort -z | xargs -0 sha256sum
