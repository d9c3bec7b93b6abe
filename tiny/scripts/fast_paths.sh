#!/usr/bin/env bash
# The tiny fast-path table (docs/results/tiny_fast_paths.md): exact unlearning beside candidate re-ranking (each
# cheap method ranks all N, unlearning scores its top 1/5/10/25%), fewer scoring timesteps, and their combinations,
# each compared with exact on the same queries (common.evaluation.fast_paths), with two exact runs of other seeds
# (Fisher, scoring noise and query draws) as the run-to-run floor. The fast rows share exact's seeds, so they
# measure what the shortcut alone changes.
#
#   bash tiny/scripts/fast_paths.sh [OUT_DIR]      (default: results/counterfactual)
#
# Uses OUT's model, data and queries (counterfactual.sh's layout; made the same way when missing). Resumable
# (finished query folders are reused). Writes OUT/fast_paths/fast_paths.{md,json}, with a row for the distilled method
# when tiny/scripts/distilled.sh has run. Environment:
#   PRESET (leave_k_out), DEVICE (cpu), QUERIES (a queries folder made elsewhere), NUM_QUERIES (8)
#   CHEAP      cheap methods ("pixel text-condition d-trak pixel+text-condition", the last two taking turns)
#   COUNTS     candidate counts as fractions of N ("0.01 0.05 0.1 0.25")
#   TIMESTEPS  scoring timesteps below the preset's, each dividing the model's 1,000 diffusion steps ("5 4 2"; "none")
#   COMBOS     METHOD:COUNT:TIMESTEPS, TIMESTEPS empty for the preset's ("pixel:0.1:5 pixel:0.25:5 d-trak:0.1:5
#              d-trak:0.25:5 pixel:0.25:2 pixel+text-condition:0.1:5 pixel+text-condition:0.2:
#              pixel+text-condition:0.2:5"; the second-last is the tiny `fast` preset's setting)
#   LEAVE_K_OUT  folders of OUT/fast_paths/ (e.g. "pixel+text-condition-0.2 distilled"): then leave-K-out at K = 20
#              (LKO_K) of exact beside them (labelled by folder, '+' as '-') in OUT/fast_paths/leave_k_out/table.md;
#              8 retrainings per ranking, about 100-200 s each here
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-leave_k_out}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
CHEAP=${CHEAP:-pixel text-condition d-trak pixel+text-condition}
COUNTS=${COUNTS:-0.01 0.05 0.1 0.25}
TIMESTEPS=${TIMESTEPS:-5 4 2}
[ "$TIMESTEPS" = none ] && TIMESTEPS=
COMBOS=${COMBOS:-pixel:0.1:5 pixel:0.25:5 d-trak:0.1:5 d-trak:0.25:5 pixel:0.25:2 pixel+text-condition:0.1:5
pixel+text-condition:0.2: pixel+text-condition:0.2:5}
FP=$OUT/fast_paths

[ -f "$OUT/data/metadata.jsonl" ] || python -m tiny.shapes --out "$OUT/data" --num-images "${NUM_IMAGES:-500}"
python -m tiny.train --data "$OUT/data" --out "$OUT/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
QUERIES=${QUERIES:-$OUT/queries}
[ -d "$QUERIES" ] || python -m common.driver tiny generate --model "$OUT/model" --out "$QUERIES" \
  --num "${NUM_QUERIES:-8}" --guidance-scale 3 --num-steps 250

ATTRIBUTE=(python -m common.driver tiny attribute --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES"
  --out "$FP" --no-plot --config "$CONFIG" --preset "$PRESET" --device "$DEVICE" --method unlearning)
ROWS=()
run() {  # NAME TAG flags...: one attribution run, then a row of the table
  local name=$1 tag=$2
  shift 2
  echo "== $name"
  "${ATTRIBUTE[@]}" --tag "$tag" "$@"
  ROWS+=("$name=$FP/$tag")
}
pct() { python -c "print(f'{float($1):.0%}')"; }

"${ATTRIBUTE[@]}" --tag exact
for S in 1 2; do  # in folders of their own: a cache folder holds one Fisher
  "${ATTRIBUTE[@]}" --out "$FP/seed$S" --tag exact --fisher.seed "$S" --loss.seed "$S" --unlearn.seed "$S"
done
for C in $CHEAP; do
  for M in $COUNTS; do
    run "$C, top $(pct "$M")" "$C-$M" --candidates.method "$C" --candidates.count "$M"
  done
done
for T in $TIMESTEPS; do
  run "$T timesteps" "t$T" --loss.num_timesteps "$T"
done
for COMBO in $COMBOS; do
  IFS=: read -r C M T <<< "$COMBO"
  if [ -z "$T" ]; then  # the preset's timesteps
    run "$C, top $(pct "$M")" "$C-$M" --candidates.method "$C" --candidates.count "$M"
  else
    run "$C, top $(pct "$M"), $T timesteps" "$C-$M-t$T" --candidates.method "$C" --candidates.count "$M" \
      --loss.num_timesteps "$T"
  fi
done
[ -d "$FP/distilled" ] && ROWS+=("distilled (tiny/scripts/distilled.sh)=$FP/distilled")
python -m common.evaluation.fast_paths --exact "$FP/exact" --floor "$FP/seed1/exact" "$FP/seed2/exact" \
  --runs "${ROWS[@]}" --out "$FP/fast_paths.md"
if [ -n "${LEAVE_K_OUT:-}" ]; then
  RANKINGS=("exact=$FP/exact")
  for TAG in $LEAVE_K_OUT; do RANKINGS+=("${TAG//+/-}=$FP/$TAG"); done
  python -m common.driver tiny leave-k-out --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES" \
    --out "$FP/leave_k_out" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE" --methods \
    --rankings "${RANKINGS[@]}" --eval.ks "${LKO_K:-20}" --eval.off_target 0
fi
