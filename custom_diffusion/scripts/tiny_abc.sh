#!/usr/bin/env bash
# The CPU twin of AbC (custom_diffusion/README.md, "The CPU twin"; measured: docs/results/tiny_abc_twin.md): concepts the tiny model never saw
# (custom_diffusion/configs/tiny_concepts.yaml: 8 objects, 8 styles, 3 seeds each) taught by Custom Diffusion
# fine-tuning, 5 generated queries per customized model, ranked over the concept's exemplars plus the pretraining
# images by every offline method; Recall@10 and mAP per concept kind, clustered by concept. Unlearning is tuned on
# the "tune" concepts (OUT/tune/) for each variant (preconditioner, weights, curvature) and reported on the
# "report" concepts only, beside pixel similarity, text alone, D-TRAK and random.
#
#   bash custom_diffusion/scripts/tiny_abc.sh [OUT_DIR]      (default: results/tiny_abc)
#
# Resumable, stage by stage. Writes OUT/models.md (how far each model's weights moved), OUT/shows.json (which queries
# show their concept), OUT/retrieval.md (methods side by side, then the queries that show their concept),
# OUT/object_vs_style.png, OUT/tune/tune.md and OUT/times.md (this invocation's stages). Environment:
#   BASE, BASE_DATA  a trained tiny model and its images (default: train one with the default preset on 2,000
#                    shapes into OUT/base, ~10 min)
#   POOL             pretraining images ranked (default 500, as AbC ranks a subset of LAION); CONCEPTS (the YAML)
#   VARIANTS         unlearning variants, PRECONDITIONER:WEIGHTS:CURVATURE[:DAMPING] each (default
#                    "diagonal:cross-attn-kv:base", the paper's); e.g. "ekfac:cross-attn-kv:base block:attn:custom";
#                    weights: cross-attn-kv, attn or all; curvature: base (the base model's, as AbC) or custom;
#                    DAMPING overrides the preset's unlearn.damping (e.g. ekfac:cross-attn-kv:base:0.1, FastGDA's)
#                    and names the variant ...-base-d0.1
#   GRID_STEP_SIZES  ("0.00003 0.0001 0.0003 0.001") and GRID_STEPS ("1 10 100"): each run takes DRAWS (1000) query
#                    draws in all, as one Newton step or as S steps of DRAWS/S (AbC takes 100 steps of 160)
#   METHODS          ("pixel random text-condition d-trak:cross-attn-kv d-trak:all"; NAME:WEIGHTS for D-TRAK)
#   SEEDS            only these replicates in every stage (e.g. "0": 16 models, 60 report queries; default all:
#                    48 models, 180); a later run with more adds theirs and keeps what is done
#   TUNE_SEEDS       tune on these replicates only (e.g. "0"; default SEEDS: all gives 60 queries per grid cell)
#   CONTROL          controls, space-separated; each runs every reported variant and method again, with its own
#                    retrieval.md. swap (or 1): the prompt-only control, each query's image swapped for another
#                    concept's, its prompt kept (tiny_abc --swap-images; OUT/controls/): a method that scores as
#                    well there ranks by the prompt. no-token: the image-only control, each query's own image under
#                    its kind's neutral prompt of CONCEPTS, without the token (--without-token; OUT/no_token/): a
#                    method that scores as well there finds the exemplars from the image
#   TUNE_CONTROL     tune under this control (swap or no-token) instead of the queries' own prompts: no-token
#                    chooses each variant's step size by the image-only score
#   TUNE_ONLY=1      stop after the tuning grid; PRESET (of tiny/configs/tiny.yaml: default); DEVICE (cpu)
#   SHARDS           processes side by side for fine-tuning and attribution (default 1), each taking every SHARDS-th
#                    concept with nproc/SHARDS threads; tiny models gain from it (docs/results/tiny_abc_twin.md).
#                    D-TRAK on all weights holds a 9 GB projection per process.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/tiny_abc}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
PRESET=${PRESET:-default}
CONCEPTS=${CONCEPTS:-custom_diffusion/configs/tiny_concepts.yaml}
DRAWS=${DRAWS:-1000}
control() {  # KIND: a control's attribute flag, its output folder and (when the images are the queries' own) the
  case $1 in   # shows file for its tables
    1 | swap) echo "--swap-images controls" ;;
    no-token) echo "--without-token no_token --shows $OUT/shows.json" ;;
    *) echo "error: CONTROL takes swap and no-token, not $1" >&2; return 2 ;;
  esac
}
for K in ${CONTROL:-} ${TUNE_CONTROL:-}; do control "$K" > /dev/null || exit 2; done
for V in ${VARIANTS:-}; do
  IFS=: read -r _ _ _ D _ <<< "$V"
  [[ -z "$D" || "$D" =~ ^[0-9.eE+-]+$ ]] || { echo "error: a variant's damping is a number, not $D ($V)" >&2; exit 2; }
done
mkdir -p "$OUT"
TIMES=$OUT/times.md
printf '| stage | seconds |\n|---|---|\n' > "$TIMES"
timed() {  # NAME command...: run it, append its wall time to OUT/times.md; its exit status
  local name=$1 start=$SECONDS status=0
  shift
  "$@" || status=$?
  if [ "$status" -eq 0 ]; then echo "| $name | $((SECONDS - start)) |"; else
    echo "| $name | $((SECONDS - start)) (failed: $status) |"; fi >> "$TIMES"
  return "$status"
}

if [ -z "${BASE:-}" ]; then
  BASE=$OUT/base/model
  BASE_DATA=$OUT/base/data
  [ -f "$BASE_DATA/metadata.jsonl" ] || python -m tiny.shapes --out "$BASE_DATA" --num-images 2000
  timed "train the base model" python -m tiny.train --data "$BASE_DATA" --out "$BASE" --config "$CONFIG" --device "$DEVICE"
fi
: "${BASE_DATA:?set BASE_DATA to the images BASE was trained on}"
TWIN=(--base "$BASE" --data "$BASE_DATA" --out "$OUT" --concepts "$CONCEPTS" --pool "${POOL:-500}" --device "$DEVICE")
twin() {  # STEP ARGS...: attribute through the driver (the tiny_abc benchmark); prepare and shows, the twin's own steps
  local step=$1
  shift
  if [ "$step" = attribute ]; then
    python -m common.driver tiny_abc attribute "${TWIN[@]}" "$@"
  else
    python -m custom_diffusion.tiny_abc "$step" "${TWIN[@]}" "$@"
  fi
}
SHARDS=${SHARDS:-1}
# STEP ARGS...: the step as SHARDS processes side by side, then once whole (it skips what they did, writes the tables)
sharded() {
  local step=$1 i status=0 pids=() threads=$(( $(nproc) / SHARDS ))
  shift
  if [ "$SHARDS" -gt 1 ]; then
    for ((i = 0; i < SHARDS; i++)); do
      OMP_NUM_THREADS=$((threads > 0 ? threads : 1)) twin "$step" --shard "$i/$SHARDS" "$@" \
        > "$OUT/shard$i.log" 2>&1 &
      pids+=($!)
    done
    for i in "${!pids[@]}"; do
      wait "${pids[$i]}" || { status=$?; tail -n 1 "$OUT/shard$i.log" >&2; }
    done
    [ "$status" -eq 0 ] || return "$status"
  fi
  twin "$step" "$@"
}
ONLY_SEEDS=()
[ -n "${SEEDS:-}" ] && ONLY_SEEDS=(--seeds "$SEEDS")
timed "prepare: exemplars, fine-tuning, queries" sharded prepare "${ONLY_SEEDS[@]}"
timed "shows: which queries show their concept" twin shows "${ONLY_SEEDS[@]}"

# Unlearning, tuned on the tune concepts per variant: every (step size, steps) of the grid, the best by mAP reported.
unlearning_args() {  # PRECONDITIONER WEIGHTS CURVATURE ALPHA STEPS [DAMPING]: the attribute flags of one run
  local per=$((DRAWS / $5)) batch
  if [ $((DRAWS % $5)) -ne 0 ]; then echo "error: GRID_STEPS must divide DRAWS ($DRAWS), not $5" >&2; return 2; fi
  batch=$((per < 100 ? per : 100))
  if [ $((per % batch)) -ne 0 ]; then echo "error: DRAWS / steps ($per) is not a multiple of 100" >&2; return 2; fi
  echo --method unlearning --config "$CONFIG" --preset "$PRESET" --unlearn.preconditioner "$1" \
    --unlearn.selection "$2" --fisher.selection "$2" --curvature "$3" --unlearn.step_size "$4" --unlearn.steps "$5" \
    --unlearn.batch_size "$batch" --unlearn.accumulations $((per / batch)) ${6:+--unlearn.damping "$6"}
}
variant() {  # SPEC: its preconditioner, weights, curvature, damping (or -) and name
  local p w c d
  IFS=: read -r p w c d <<< "$1"
  echo "$p" "$w" "$c" "${d:--}" "unlearning-$p-$w-$c${d:+-d$d}"
}
TUNE_FLAGS=()
if [ -n "${TUNE_CONTROL:-}" ]; then read -r FLAG _ < <(control "$TUNE_CONTROL"); TUNE_FLAGS=("$FLAG"); fi
mkdir -p "$OUT/tune"
TUNE_SPLIT=(--split tune)
[ -n "${TUNE_SEEDS:-${SEEDS:-}}" ] && TUNE_SPLIT+=(--seeds "${TUNE_SEEDS:-$SEEDS}")
REPORT_SPLIT=(--split report "${ONLY_SEEDS[@]}")
for V in ${VARIANTS:-diagonal:cross-attn-kv:base}; do
  read -r P W C D NAME < <(variant "$V")
  [ "$D" = - ] && D=
  rm -f "$OUT/tune/$NAME.rows"
  for A in ${GRID_STEP_SIZES:-0.00003 0.0001 0.0003 0.001}; do
    for S in ${GRID_STEPS:-1 10 100}; do
      TAG=tune/$NAME/a$A-s$S
      read -ra FLAGS < <(unlearning_args "$P" "$W" "$C" "$A" "$S" "$D")
      if ! timed "tune $TAG" sharded attribute "${TUNE_SPLIT[@]}" "${TUNE_FLAGS[@]}" --tag "$TAG" "${FLAGS[@]}" \
        --no-plot > "$OUT/tune/last.log" 2>&1; then
        echo "| $P | $W | $C | ${D:-preset} | $A | $S | refused: $(tail -n 1 "$OUT/tune/last.log") | – |" \
          >> "$OUT/tune/$NAME.rows"
        continue
      fi
      python - "$OUT/$TAG" "$P | $W | $C | ${D:-preset} | $A | $S" >> "$OUT/tune/$NAME.rows" <<'PY'
import json, statistics, sys
from pathlib import Path
out, cells = Path(sys.argv[1]), sys.argv[2]
rows = list(json.loads((out / "retrieval.json").read_text()).values())
updates = [json.loads(p.read_text())["stats"]["relative_update"] for p in out.glob("*/*/ranking.json")]
print(f"| {cells} | {sum(r['ap'] for r in rows) / len(rows):.4f} | {statistics.median(updates):.2%} |")
PY
    done
  done
done
{
  [ -n "${TUNE_CONTROL:-}" ] && echo "Tuned under the control $TUNE_CONTROL." && echo
  echo "| preconditioner | weights | curvature | damping | step size | steps | mAP (tune concepts) |" \
    "median relative update |"
  echo "|---|---|---|---|---|---|---|---|"
  cat "$OUT"/tune/*.rows
} > "$OUT/tune/tune.md"
cat "$OUT/tune/tune.md"
[ -n "${TUNE_ONLY:-}" ] && exit 0

for V in ${VARIANTS:-diagonal:cross-attn-kv:base}; do
  read -r P W C D NAME < <(variant "$V")
  [ "$D" = - ] && D=
  read -r A S < <(python -c "
rows = [line.strip('|\n').split('|') for line in open('$OUT/tune/$NAME.rows')]
rows = [r for r in rows if not r[6].strip().startswith('refused')]
if rows:  # the first of equals: the grid's order
    best = max(rows, key=lambda r: float(r[6]))
    print(best[4].strip(), best[5].strip())")
  if [ -z "${A:-}" ]; then echo "$NAME: every grid cell was refused (OUT/tune/$NAME.rows)" | tee -a "$OUT/tune/tune.md"; continue; fi
  echo "$NAME: chosen on the tune concepts: step size $A, $S step(s)" | tee -a "$OUT/tune/tune.md"
  read -ra FLAGS < <(unlearning_args "$P" "$W" "$C" "$A" "$S" "$D")
  timed "report: $NAME" sharded attribute "${REPORT_SPLIT[@]}" --tag "$NAME" "${FLAGS[@]}"
  for K in ${CONTROL:-}; do
    read -r FLAG DIR _ < <(control "$K")
    timed "control $K: $NAME" sharded attribute "${REPORT_SPLIT[@]}" "$FLAG" --tag "$DIR/$NAME" "${FLAGS[@]}" --no-plot
  done
done
for M in ${METHODS:-pixel random text-condition d-trak:cross-attn-kv d-trak:all}; do
  IFS=: read -r NAME W <<< "$M"
  EXTRA=()
  [ "$NAME" = random ] && EXTRA=(--random.per_query)  # retrieval is judged per query (custom_diffusion/README.md)
  [ -n "${W:-}" ] && EXTRA=(--tag "$NAME-$W" "--${NAME//-/_}.selection" "$W")
  timed "report: $M" sharded attribute "${REPORT_SPLIT[@]}" --method "$NAME" --config "$CONFIG" --preset "$PRESET" \
    "${EXTRA[@]}"
  for K in ${CONTROL:-}; do
    read -r FLAG DIR _ < <(control "$K")
    timed "control $K: $M" sharded attribute "${REPORT_SPLIT[@]}" --method "$NAME" --config "$CONFIG" \
      --preset "$PRESET" "${EXTRA[@]}" "$FLAG" --tag "$DIR/$NAME${W:+-$W}" --no-plot
  done
done
python -m common.driver tiny_abc compare --out "$OUT"
for K in ${CONTROL:-}; do
  read -r _ DIR SHOWS < <(control "$K")
  # shellcheck disable=SC2086
  python -m common.driver tiny_abc compare --out "$OUT/$DIR" $SHOWS
done
cat "$TIMES"
