#!/usr/bin/env bash
# Every registered method on the tiny benchmark, measured the same way (tiny/README.md, "Methods compared";
# settings and reading: docs/results/tiny_methods_compared.md):
# self-attribution of 20 training images, agreement of the top-10 with 8 generated queries' prompts,
# preparation time and time per query; one table in OUT/compare/comparison.md.
#
#   bash tiny/scripts/compare.sh [OUT_DIR]        (default: results/quickstart; reuses its data and model)
#
# Environment: METHODS (default: every offline method, then the feature methods; unlearning-ekfac and
# unlearning-block are unlearning with that preconditioner, docs/results/tiny_curvature.md), ENSEMBLE (TRAK's models,
# default 3: the model plus 2 trained with other seeds), CLIP_WEIGHTS / DINO_WEIGHTS / DINOV2_WEIGHTS /
# ABC_MAPPER (hub ids or local paths; without them those rows say what is missing), DEVICE (cpu), PRESET.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/quickstart}
PRESET=${PRESET:-default}
DEVICE=${DEVICE:-cpu}
ENSEMBLE=${ENSEMBLE:-3}
CONFIG=tiny/configs/tiny.yaml
METHODS=${METHODS:-unlearning unlearning-ekfac unlearning-block pixel random trak journey-trak d-trak clip clip-text dino dinov2 abc}

[ -f "$OUT/data/metadata.jsonl" ] || python -m tiny.shapes --out "$OUT/data" --num-images "${NUM_IMAGES:-2000}"
python -m tiny.train --data "$OUT/data" --out "$OUT/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE" \
  --ensemble "$ENSEMBLE"
MEMBERS=()
for ((s = 1; s < ENSEMBLE; s++)); do MEMBERS+=("$OUT/model-seed$s"); done

EVAL=(python -m common.driver tiny evaluate --model "$OUT/model" --data "$OUT/data" --out "$OUT/compare" --config "$CONFIG"
  --preset "$PRESET" --device "$DEVICE" --guidance-scale 3)
NOTES=()
mkdir -p "$OUT/compare"
for M in $METHODS; do
  EXTRA=()
  METHOD=$M
  case $M in
    unlearning-ekfac | unlearning-block)
      METHOD=unlearning EXTRA=(--unlearn.preconditioner "${M#unlearning-}" --tag "$M") ;;
    trak) [ ${#MEMBERS[@]} -gt 0 ] && EXTRA=(--trak.ensemble "${MEMBERS[@]}") ;;
    journey-trak) [ ${#MEMBERS[@]} -gt 0 ] && EXTRA=(--journey_trak.ensemble "${MEMBERS[@]}") ;;
    clip) EXTRA=(${CLIP_WEIGHTS:+--clip.weights "$CLIP_WEIGHTS"}) ;;
    clip-text) EXTRA=(${CLIP_WEIGHTS:+--clip_text.weights "$CLIP_WEIGHTS"}) ;;
    dino) EXTRA=(${DINO_WEIGHTS:+--dino.weights "$DINO_WEIGHTS"}) ;;
    dinov2) EXTRA=(${DINOV2_WEIGHTS:+--dinov2.weights "$DINOV2_WEIGHTS"}) ;;
    abc) EXTRA=(${ABC_MAPPER:+--abc.mapper "$ABC_MAPPER"} ${DINO_WEIGHTS:+--abc.weights "$DINO_WEIGHTS"}) ;;
  esac
  echo "== $M"
  START=$(date +%s)
  if "${EVAL[@]}" --method "$METHOD" ${EXTRA[@]+"${EXTRA[@]}"} 2> "$OUT/compare/$M.log"; then
    echo "   ($M: $(($(date +%s) - START)) s)"
  else
    REASON=$(grep '^error: ' "$OUT/compare/$M.log" | tail -1 | sed 's/^error: //; s/|/\//g')
    echo "   $M not measured: ${REASON:-see $OUT/compare/$M.log}"
    NOTES+=("$M=not measured: ${REASON:-failed, see $M.log}")
  fi
done
python -m common.driver tiny compare --out "$OUT/compare" --tags $METHODS --note ${NOTES[@]+"${NOTES[@]}"}
