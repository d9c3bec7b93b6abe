#!/usr/bin/env bash
# The CPU twin of AbC (custom_diffusion/README.md, "The CPU twin"): concepts the tiny model never saw
# (custom_diffusion/configs/tiny_concepts.yaml) taught by Custom Diffusion fine-tuning, 5 generated queries
# each, ranked over the concept's exemplars plus the pretraining images by every offline method; Recall@10
# and mAP per concept kind. The unlearning step size and number of steps are chosen on the "tune" concepts
# (OUT/tune/) and reported on the "report" concepts only, beside pixel similarity, D-TRAK and random.
#
#   bash custom_diffusion/scripts/tiny_abc.sh [OUT_DIR]      (default: results/tiny_abc)
#
# Resumable. Writes OUT/retrieval.md (methods side by side), OUT/object_vs_style.png, OUT/tune/tune.md and
# OUT/times.md (this invocation's stages). Environment: BASE and BASE_DATA (a trained tiny model and its
# images; default: train one with the default preset on 2,000 shapes into OUT/base, ~10 min), POOL (pretraining
# images ranked, default 500, as AbC ranks a subset of LAION), CONCEPTS (the YAML), GRID_STEP_SIZES ("0.0001
# 0.0004": around the leave_k_out preset's 2e-4 at N = 500), GRID_STEPS ("1 10": 1 step of 1,000 query draws,
# or 10 steps of 100), METHODS ("pixel random d-trak"), PRESET (of tiny/configs/tiny.yaml: default), DEVICE (cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/tiny_abc}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
PRESET=${PRESET:-default}
CONCEPTS=${CONCEPTS:-custom_diffusion/configs/tiny_concepts.yaml}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
TIMES=$OUT/times.md
printf '| stage | seconds |\n|---|---|\n' > "$TIMES"
timed() {  # NAME command...: run it, append its wall time to OUT/times.md
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "| $name | $((SECONDS - start)) |" >> "$TIMES"
}

if [ -z "${BASE:-}" ]; then
  BASE=$OUT/base/model
  BASE_DATA=$OUT/base/data
  [ -f "$BASE_DATA/metadata.jsonl" ] || python -m tiny.shapes --out "$BASE_DATA" --num-images 2000
  timed "train the base model" python -m tiny.train --data "$BASE_DATA" --out "$BASE" --config "$CONFIG" --device "$DEVICE"
fi
: "${BASE_DATA:?set BASE_DATA to the images BASE was trained on}"
TWIN=(python -m custom_diffusion.tiny_abc --base "$BASE" --data "$BASE_DATA" --out "$OUT" --concepts "$CONCEPTS"
  --pool "${POOL:-500}" --device "$DEVICE")
timed "prepare: exemplars, fine-tuning, queries" "${TWIN[@]}" prepare

# Unlearning, tuned on the tune concepts: AbC's setting is 100 Newton steps of 160 draws; at tiny scale one step of
# 1,000 draws or 10 steps of 100, at each step size (alpha / N with N the ranked set's size, as the tiny benchmark).
mkdir -p "$OUT/tune"
rm -f "$OUT/tune/rows.md"
for A in ${GRID_STEP_SIZES:-0.0001 0.0004}; do
  for S in ${GRID_STEPS:-1 10}; do
    case $S in 1|2|5|10) ;; *) echo "error: GRID_STEPS must divide the 10 accumulations (1, 2, 5 or 10), not $S" >&2; exit 2 ;; esac
    TAG=tune/unlearning-a$A-s$S
    timed "tune $TAG" "${TWIN[@]}" attribute --split tune --tag "$TAG" --method unlearning --config "$CONFIG" \
      --preset "$PRESET" --unlearn.step_size "$A" --unlearn.steps "$S" --unlearn.accumulations $((10 / S)) --no-plot > /dev/null
    python -c "import json; r = list(json.load(open('$OUT/$TAG/retrieval.json')).values())
print('| $A | $S | %.4f |' % (sum(x['ap'] for x in r) / len(r)))" >> "$OUT/tune/rows.md"
  done
done
read -r A S < <(python -c "
rows = [line.strip('|\n').split('|') for line in open('$OUT/tune/rows.md')]
best = max(rows, key=lambda r: float(r[2]))  # the first of equals: the grid's order
print(best[0].strip(), best[1].strip())")
BEST=("$A" "$S")
{ echo "| step size | steps | mAP (tune concepts) |"; echo "|---|---|---|"; cat "$OUT/tune/rows.md"; } > "$OUT/tune/tune.md"
echo "chosen on the tune concepts: step size ${BEST[0]}, ${BEST[1]} step(s)" | tee -a "$OUT/tune/tune.md"

timed "report: unlearning" "${TWIN[@]}" attribute --split report --tag unlearning --method unlearning \
  --config "$CONFIG" --preset "$PRESET" --unlearn.step_size "${BEST[0]}" --unlearn.steps "${BEST[1]}" \
  --unlearn.accumulations $((10 / BEST[1]))
for M in ${METHODS:-pixel random d-trak}; do
  EXTRA=()
  [ "$M" = random ] && EXTRA=(--random.per_query)  # retrieval is judged per query (custom_diffusion/README.md)
  timed "report: $M" "${TWIN[@]}" attribute --split report --method "$M" --config "$CONFIG" --preset "$PRESET" \
    "${EXTRA[@]}"
done
python -m custom_diffusion.compare "$OUT"
cat "$TIMES"
