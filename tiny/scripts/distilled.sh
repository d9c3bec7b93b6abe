#!/usr/bin/env bash
# Distilled attribution on the tiny benchmark (docs/results/tiny_fast_paths.md), FastGDA's recipe at CPU scale:
# queries generated from training captions, the teacher (unlearning, re-ranking a cheap method's candidates as
# FastGDA scored only each query's nearest neighbours) on each, a distilled model trained on its rankings with the
# last 10% of the queries held out (mAP@K against the teacher), then the distilled method on OUT's own queries
# (beside the fast-path table's rows) and the index step's latency at N = 2,000 and 118,287.
#
#   bash tiny/scripts/distilled.sh [OUT_DIR]      (default: results/counterfactual)
#
# Uses OUT's model, data and queries (counterfactual.sh's layout; run fast_paths.sh first for the table).
# Resumable. Writes OUT/distilled/{prompts.txt, train_queries/, model/, latency.md}, the teacher's rankings in
# OUT/fast_paths/distill-teacher/ and the distilled method's in OUT/fast_paths/distilled/. Environment: PRESET
# (leave_k_out), DEVICE (cpu), NUM_TRAIN_QUERIES (120), TEACHER_FLAGS (default "--candidates.method pixel
# --candidates.count 0.25"), DISTILL_FLAGS (extra distill flags), QUERIES (the queries to attribute, OUT/queries).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-leave_k_out}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
D=$OUT/distilled
read -ra TEACHER <<< "${TEACHER_FLAGS:---candidates.method pixel --candidates.count 0.25}"
read -ra EXTRA <<< "${DISTILL_FLAGS:-}"
COMMON=(--model "$OUT/model" --data "$OUT/data" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE")
[ -f "$OUT/model/model.json" ] || {
  echo "error: $OUT/model is missing: run tiny/scripts/fast_paths.sh $OUT first" >&2
  exit 1
}
mkdir -p "$D"

[ -f "$D/prompts.txt" ] || python - "$OUT/data/metadata.jsonl" "${NUM_TRAIN_QUERIES:-120}" > "$D/prompts.txt" <<'PY'
import json, random, sys
captions = [json.loads(line)["text"] for line in open(sys.argv[1])]
for caption in random.Random(0).sample(captions, int(sys.argv[2])):  # FastGDA: queries from training captions
    print(caption)
PY
[ -d "$D/train_queries" ] || python -m common.driver tiny generate --model "$OUT/model" --out "$D/train_queries" \
  --prompts "$D/prompts.txt" --guidance-scale 3 --num-steps 250 --seed 1 --device "$DEVICE"
# The teacher's runs sit beside the fast-path runs, to share their Fisher, pretrained losses and pixel cache.
python -m common.driver tiny attribute "${COMMON[@]}" --queries "$D/train_queries" --out "$OUT/fast_paths" \
  --tag distill-teacher --no-plot --method unlearning "${TEACHER[@]}"
python -m common.driver tiny distill "${COMMON[@]}" --queries "$D/train_queries" \
  --teacher "$OUT/fast_paths/distill-teacher" --out "$D/model" "${EXTRA[@]}"
python -m common.driver tiny attribute "${COMMON[@]}" --queries "${QUERIES:-$OUT/queries}" --out "$OUT/fast_paths" \
  --no-plot --method distilled --distilled.file "$D/model"
python -m common.distillation.latency --sizes 2000 118287 --dims 128 768 | tee "$D/latency.md"
