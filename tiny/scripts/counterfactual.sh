#!/usr/bin/env bash
# Leave-K-out table on the tiny benchmark: for each generated query and each method (unlearning,
# pixel similarity, random), remove the top-K training images, retrain from scratch with the same
# recipe and seed, and measure how much the model lost the query (ΔL, regeneration MSE, CLIP when
# weights are given). Resumable: rerun the same command after an interruption.
#
#   bash tiny/scripts/counterfactual.sh [OUT_DIR]            (default: results/counterfactual)
#
# Optionally the noise floor: the random baseline again at one K with other exclusion modes, to compare
# the spread of ΔL over random sets (noise_floor.json in each folder; ~6 min per mode).
#
# Environment: METHODS (registered methods, default "unlearning pixel random"; e.g. add "trak journey-trak d-trak"),
# VARIANTS (Table 2 variants measured by table2.sh in OUT/table2, e.g. "newton_all": each is attributed with
# its settings and chosen step size and becomes its own row), KS (the preset's eval.ks if empty),
# PRESET (default "leave_k_out"; "micro" is a seconds-long smoke run), QUERIES (a queries folder made elsewhere,
# with saved noise, e.g. OUT/table2/generated_queries; default: NUM_QUERIES (8) generated into OUT/queries),
# NUM_IMAGES (500), SAMPLE_STEPS (250 DDPM steps per query and regeneration), DEVICE (cpu),
# CLIP_WEIGHTS (open_clip tag or path; empty: no CLIP column), EXCLUSION_MODE (the preset's: zero),
# OFF_TARGET (the off-target control: each removal's ΔL also on the next OFF_TARGET queries, measured on the
# models already retrained; default 4, or all other queries when there are fewer; 0: off),
# NOISE_FLOOR_K (5), NOISE_FLOOR_MODES (empty: none; e.g. "remove mask"). docs/results/tiny_leave_k_out.md's tables came from
#   (every method, after table2.sh, on Table 2's generated queries)
#   QUERIES=results/counterfactual/table2/generated_queries METHODS="pixel random trak d-trak journey-trak" \
#     VARIANTS="newton_kv newton_all" KS=20 bash tiny/scripts/counterfactual.sh
#   (the first table, unlearning at the preset's step)
#   EXCLUSION_MODE=mask NOISE_FLOOR_MODES="remove zero" bash tiny/scripts/counterfactual.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-leave_k_out}
NUM_QUERIES=${NUM_QUERIES:-8}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml

variant_flags() {  # the unlearning, Fisher and loss settings of a Table 2 variant, as command-line flags
  python - "$OUT/table2/$1/report.json" <<'PY'
import json, sys
settings = json.load(open(sys.argv[1]))["settings"]
flags = []
for section in ("unlearn", "fisher", "loss"):
    for key, value in settings.get(section, {}).items():
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{section}.{key}")
        elif value != "":
            flags += [f"--{section}.{key}", str(value)]
if "fisher" not in settings:  # SGD needs no Fisher; the check of the selections still wants them equal
    flags += ["--fisher.selection", settings["unlearn"]["selection"]]
print(*flags)
PY
}
for V in ${VARIANTS:-}; do  # before any work: every variant's settings must be readable
  variant_flags "$V" > /dev/null 2>&1 || {
    echo "error: cannot read $V's settings from $OUT/table2/$V/report.json: run tiny/scripts/table2.sh $OUT first" >&2
    exit 1
  }
done
[ -f "$OUT/data/metadata.jsonl" ] || python -m tiny.shapes --out "$OUT/data" --num-images "${NUM_IMAGES:-500}"
python -m tiny.train --data "$OUT/data" --out "$OUT/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
QUERIES=${QUERIES:-$OUT/queries}
[ -d "$QUERIES" ] || python -m common.driver tiny generate --model "$OUT/model" --out "$QUERIES" --num "$NUM_QUERIES" \
  --guidance-scale 3 --num-steps "${SAMPLE_STEPS:-250}"
python -m common.driver tiny attribute --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES" --out "$OUT/attribution" \
  --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
NUM_QUERIES_FOUND=$(find "$QUERIES" -mindepth 1 -maxdepth 1 -type d | wc -l)
OFF_TARGET=${OFF_TARGET:-$((NUM_QUERIES_FOUND - 1 < 4 ? NUM_QUERIES_FOUND - 1 : 4))}
RANKINGS=()
for V in ${VARIANTS:-}; do  # a Table 2 variant: attributed with every unlearning setting table2.sh used
  # shellcheck disable=SC2046
  python -m common.driver tiny attribute --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES" \
    --out "$OUT/attribution_$V" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE" $(variant_flags "$V")
  RANKINGS+=("$V=$OUT/attribution_$V/unlearning")
done
# shellcheck disable=SC2086
python -m common.driver tiny leave-k-out --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES" \
  --attribution "$OUT/attribution" --out "$OUT/leave_k_out" --config "$CONFIG" --preset "$PRESET" \
  --device "$DEVICE" --methods ${METHODS:-unlearning pixel random} ${KS:+--eval.ks $KS} \
  ${RANKINGS[@]:+--rankings "${RANKINGS[@]}"} ${CLIP_WEIGHTS:+--eval.clip_weights "$CLIP_WEIGHTS"} \
  ${EXCLUSION_MODE:+--train.exclusion_mode "$EXCLUSION_MODE"} --eval.off_target "$OFF_TARGET"
for MODE in ${NOISE_FLOOR_MODES:-}; do
  python -m common.driver tiny leave-k-out --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES" \
    --out "$OUT/noise_floor_$MODE" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE" --methods random \
    --eval.ks "${NOISE_FLOOR_K:-5}" --train.exclusion_mode "$MODE"
done
echo "table: $OUT/leave_k_out/table.md (csv: table.csv, plot: delta_loss.png)"
echo "noise floor: $OUT/leave_k_out/noise_floor.json${NOISE_FLOOR_MODES:+ and $OUT/noise_floor_*/noise_floor.json}"
