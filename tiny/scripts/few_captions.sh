#!/usr/bin/env bash
# Self-attribution when captions are few (docs/results/tiny_few_captions.md): the same 500 images as
# the leave-K-out set, captioned only by colour and shape ("a red circle": 24 distinct captions), a model
# trained on them with the leave-K-out recipe, and unlearning with each weight selection at the step size
# table2.sh chose for it. Updating only the text's K/V acts through the caption, so images that share a
# caption may score alike; updating more weights may separate them.
#
#   bash tiny/scripts/few_captions.sh [OUT_DIR]    (default: results/counterfactual; run table2.sh first)
#
# Writes OUT/few_captions/comparison.md beside OUT/table2/comparison.md (the same 10 training images).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-leave_k_out}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
VARIANTS=${VARIANTS:-newton_kv newton_cross_attn newton_attn newton_all}
FEW=$OUT/few_captions

[ -f "$FEW/data/metadata.jsonl" ] || python -m tiny.shapes --out "$FEW/data" --num-images "${NUM_IMAGES:-500}" \
  --captions class
python -m tiny.train --data "$FEW/data" --out "$FEW/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"

EVAL=(python -m common.driver tiny evaluate --model "$FEW/model" --data "$FEW/data" --out "$FEW" --config "$CONFIG"
  --preset "$PRESET" --device "$DEVICE" --num-generated 0)
mkdir -p "$FEW"
for V in $VARIANTS; do
  REPORT=$OUT/table2/$V/report.json
  [ -f "$REPORT" ] || { echo "error: $REPORT is missing: run tiny/scripts/table2.sh $OUT first" >&2; exit 1; }
  # The variant's unlearning settings and training images as table2.sh measured them.
  read -r SEL STEP PICKS < <(python -c "
import json; r = json.load(open('$REPORT')); u = r['settings']['unlearn']
print(u['selection'], u['step_size'], *r['self_picks'])")
  echo "== $V: $SEL at step size $STEP"
  # shellcheck disable=SC2086
  "${EVAL[@]}" --tag "$V" --self-picks $PICKS --method unlearning --unlearn.method newton --unlearn.selection "$SEL" \
    --fisher.selection "$SEL" --unlearn.step_size "$STEP" 2> "$FEW/$V.log" > "$FEW/$V.md"
  sed -n 2p "$FEW/$V.md"
done
python -m common.driver tiny compare --out "$FEW" --tags $VARIANTS
