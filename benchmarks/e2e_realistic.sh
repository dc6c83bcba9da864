#!/usr/bin/env bash
# End-to-end on realistic generated data (1 mm, ~40 participants x 2 sessions): raw BIDS -> t1-linear ->
# image tensors -> subject-level split -> 3D CNN on CPU -> test predictions. Then the same images with
# random labels as the chance-level control. Prints wall times and the test balanced accuracy of both.
# Usage: benchmarks/e2e_realistic.sh [WORK_DIR] (needs the environment: make env; PATH=.venv/bin:$PATH)
set -euo pipefail
WORK=${1:-/tmp/bids_app_e2e}
N_SUBJECTS=${N_SUBJECTS:-40}
N_SESSIONS=${N_SESSIONS:-2}
NPROCS=${NPROCS:-2}
MODE=${MODE:-roi}            # roi: the medial-temporal region; image: the whole 169x208x179 volume
ARCH=${ARCH:-conv4_fc3}
EPOCHS=${EPOCHS:-20}  # the defaults (lr 1e-3, batch 8, z-scored tensors): benchmarks/bench_effect_sweep.py
rm -rf "$WORK"
mkdir -p "$WORK"
t() { date +%s; }

t0=$(t)
bids_app-generate "$WORK/bids" --n-subjects "$N_SUBJECTS" --n-sessions "$N_SESSIONS" --preset realistic \
  --seed 7 --effect-size 0.6 >/dev/null
bids_app-generate "$WORK/bids_random" --n-subjects "$N_SUBJECTS" --n-sessions "$N_SESSIONS" --preset realistic \
  --seed 7 --effect-size 0.6 --random-labels >/dev/null
t1=$(t)
bids_app "$WORK/bids" "$WORK/out" participant --nprocs "$NPROCS" --omp-nthreads 1 --modes image roi \
  --roi-mask "hippocampus=$WORK/bids/code/template/roi-hippocampus_mask.nii.gz" 2>"$WORK/participant.log"
t2=$(t)
group() {  # $1 bids dir, $2 model name
  bids_app "$1" "$WORK/out" group --label diagnosis --task classification --mode "$MODE" --architecture "$ARCH" \
    --epochs "$EPOCHS" --n-splits 1 --test-size 0.25 \
    --selection-metrics loss balanced_accuracy --model-name "$2" --seed 7 --omp-nthreads 2 2>"$WORK/$2.log"
}
group "$WORK/bids" real
t3=$(t)
group "$WORK/bids_random" random
t4=$(t)

ba() { awk -F'\t' '$1=="balanced_accuracy"{printf "%s [%s, %s]", $2, $3, $4}' \
  "$WORK/out/models/$1/split-0/best-loss/test/test_image_level_metrics.tsv"; }
n_images=$(find "$WORK/out" -name '*desc-image_T1w.npy' | wc -l)
test_n=$(($(wc -l < "$WORK/out/models/real/groups/test/data.tsv") - 1))
echo "participants x sessions        : $N_SUBJECTS x $N_SESSIONS ($n_images images), $NPROCS processes"
echo "generation                     : $((t1 - t0)) s"
echo "participant level (t1-linear)  : $((t2 - t1)) s ($(( (t2 - t1) * NPROCS / n_images )) s per image per process)"
echo "group level, real labels       : $((t3 - t2)) s ($ARCH on $MODE, $EPOCHS epochs)"
echo "group level, random labels     : $((t4 - t3)) s"
echo "test images                    : $test_n (baseline sessions of held-out participants)"
echo "test balanced accuracy, real   : $(ba real)"
echo "test balanced accuracy, random : $(ba random)"
