#!/usr/bin/env bash
# Leave-K-out table on the tiny benchmark: for each generated query and each method (unlearning,
# pixel similarity, random), remove the top-K training images, retrain from scratch with the same
# recipe and seed, and measure how much the model lost the query (ΔL, regeneration MSE, CLIP when
# weights are given). Resumable: rerun the same command after an interruption.
#
#   bash tiny/scripts/counterfactual.sh [OUT_DIR]            (default: results/counterfactual)
#
# Environment: PRESET (default "default"; "micro" is a seconds-long smoke run), NUM_QUERIES (8),
# NUM_IMAGES (2000), DEVICE (cpu), CLIP_WEIGHTS (open_clip tag or path; empty: no CLIP column).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-default}
NUM_QUERIES=${NUM_QUERIES:-8}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

[ -f "$OUT/data/metadata.jsonl" ] || python -m tiny.shapes --out "$OUT/data" --num-images "${NUM_IMAGES:-2000}"
python -m tiny.train --data "$OUT/data" --out "$OUT/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
[ -d "$OUT/queries" ] || python -m tiny.generate --model "$OUT/model" --out "$OUT/queries" --num "$NUM_QUERIES" \
  --guidance-scale 3 --num-steps "${SAMPLE_STEPS:-1000}"
python -m tiny.attribute --model "$OUT/model" --data "$OUT/data" --queries "$OUT/queries" --out "$OUT/attribution" \
  --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
python -m tiny.counterfactual --model "$OUT/model" --data "$OUT/data" --queries "$OUT/queries" \
  --attribution "$OUT/attribution" --out "$OUT/leave_k_out" --config "$CONFIG" --preset "$PRESET" \
  --device "$DEVICE" ${CLIP_WEIGHTS:+--eval.clip_weights "$CLIP_WEIGHTS"}
echo "table: $OUT/leave_k_out/table.md (csv: table.csv, plot: delta_loss.png)"
