#!/usr/bin/env bash
# Scoring and Fisher speed against loops written the way the original release writes them, on the MSCOCO
# UNet (random init) at the paper's shapes, plus the bf16-vs-fp32 top-100 overlap (mscoco/README.md).
#
#   bash mscoco/scripts/bench.sh [OUT_JSON]        (default: results/mscoco/bench-<device>.json)
#
# Environment: DEVICE (auto: CUDA when present), IMAGES (160 on a GPU; 4 on a CPU: ~40 min on 2 cores, most of
# it in bf16, which a CPU runs ~18x slower than fp32),
# FISHER_SAMPLES (256; 32 on a CPU), COMPILE (1 on a GPU: also time torch.compile; 0 on a CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-auto}
if [ "$DEVICE" = cpu ] || { [ "$DEVICE" = auto ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }; then
  IMAGES=${IMAGES:-4} FISHER_SAMPLES=${FISHER_SAMPLES:-32} COMPILE=${COMPILE:-0} NAME=cpu
else
  IMAGES=${IMAGES:-160} FISHER_SAMPLES=${FISHER_SAMPLES:-256} COMPILE=${COMPILE:-1} NAME=gpu
fi
FLAGS=()
[ "$COMPILE" = 1 ] && FLAGS=(--compile)
OUT=${1:-results/mscoco/bench-$NAME.json}
mkdir -p "$(dirname "$OUT")"
python -m mscoco.bench --device "$DEVICE" --images "$IMAGES" --images-per-batch "$((IMAGES < 80 ? IMAGES : 80))" \
  --fisher-samples "$FISHER_SAMPLES" --out "$OUT" "${FLAGS[@]}"
