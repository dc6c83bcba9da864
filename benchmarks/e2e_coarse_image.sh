#!/usr/bin/env bash
# End to end in whole-image mode on a coarse grid: generated 1 mm data (template-space images as a derivative, so
# no registration) -> participant level with --modes image --image-voxel-size 3 (57x70x60 tensors, anti-aliased)
# -> subject-level split (25 % test) -> conv3_fc3_3mm on CPU -> test predictions with the linear baseline beside.
# Prints the wall time of each step, the tensor shape, and the test balanced accuracy of the network and of the
# baseline with their 95 % bootstrap CI and n.
# Usage: benchmarks/e2e_coarse_image.sh [WORK_DIR] (needs the environment: make env; PATH=.venv/bin:$PATH)
# Knobs (environment): N_SUBJECTS (40), N_SESSIONS (1), PRESET (realistic: 1 mm; medium: 2 mm), VOXEL_MM (3),
# ARCH (conv3_fc3_3mm; conv4_fc3_2mm for VOXEL_MM=2), EPOCHS (20, the default), EFFECT (0.6), NPROCS (2), SEED (7).
set -euo pipefail
WORK=${1:-/tmp/bids_app_e2e_coarse}
N_SUBJECTS=${N_SUBJECTS:-40}
N_SESSIONS=${N_SESSIONS:-1}
PRESET=${PRESET:-realistic}
VOXEL_MM=${VOXEL_MM:-3}
ARCH=${ARCH:-conv3_fc3_3mm}
EPOCHS=${EPOCHS:-20}
EFFECT=${EFFECT:-0.6}
NPROCS=${NPROCS:-2}
SEED=${SEED:-7}
rm -rf "$WORK"
mkdir -p "$WORK"
t() { date +%s; }

t0=$(t)
bids_app-generate "$WORK/bids" --n-subjects "$N_SUBJECTS" --n-sessions "$N_SESSIONS" --preset "$PRESET" \
  --seed "$SEED" --effect-size "$EFFECT" --preprocessed derivative >/dev/null
t1=$(t)
grid=()  # realistic: the default template (nilearn's 1 mm MNI152 2009a) and crop 169x208x179
if [ "$PRESET" = medium ]; then
  grid=(--template "$(ls "$WORK"/bids/code/template/tpl-*_res-2mm_T1w.nii.gz)" --crop-shape 84 104 88)
fi
bids_app "$WORK/bids" "$WORK/out" participant -d "$WORK/bids/derivatives/preproc" "${grid[@]}" --modes image \
  --image-voxel-size "$VOXEL_MM" --nprocs "$NPROCS" --omp-nthreads 1 --seed "$SEED" 2>"$WORK/participant.log"
t2=$(t)
bids_app "$WORK/bids" "$WORK/out" group --label diagnosis --task classification --mode image --architecture "$ARCH" \
  --epochs "$EPOCHS" --n-splits 1 --test-size 0.25 --selection-metrics loss balanced_accuracy --model-name coarse \
  --seed "$SEED" --omp-nthreads 2 2>"$WORK/group.log"
t3=$(t)

n_images=$(find "$WORK/out" -name '*desc-image_T1w.npy' | wc -l)
shape=$(python3 -c 'import json, sys; print("x".join(map(str, json.load(open(sys.argv[1]))["Shape"][1:])))' \
  "$(find "$WORK/out" -name '*desc-image_T1w.json' | head -n 1)")
echo "participants x sessions : $N_SUBJECTS x $N_SESSIONS ($n_images images, preset $PRESET, effect $EFFECT)"
echo "image tensors           : $shape at $VOXEL_MM mm"
echo "generation              : $((t1 - t0)) s"
echo "participant level       : $((t2 - t1)) s ($NPROCS processes, preprocessed inputs)"
echo "group level             : $((t3 - t2)) s ($ARCH, $EPOCHS epochs, split + train + baseline + predict)"
echo "test balanced accuracy [95 % CI]:"
awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i }
  $c["metric"] == "balanced_accuracy" {
    printf "  network  %s [%s, %s]\n  baseline %s [%s, %s]\n  n_images %s, n_participants %s, %s\n",
      $c["value"], $c["ci_low"], $c["ci_high"], $c["baseline_value"], $c["baseline_ci_low"], $c["baseline_ci_high"],
      $c["n_images"], $c["n_participants"], $c["training_status"] }' \
  "$WORK/out/models/coarse/split-0/best-loss/test/test_image_level_metrics.tsv"
