#!/usr/bin/env bash
# One row of the paper's MSCOCO leave-K-out tables (mscoco/README.md, "Leave-K-out"): rank the training
# set for each query with a method (common.driver mscoco attribute), then remove each query's top-K, retrain with the
# paper's recipe and measure ΔL, regeneration MSE and CLIP similarity (common.driver mscoco leave-k-out). Every row
# writes into OUT/leave_k_out, whose table.md and paper.md (ours beside the paper's) gather all rows so far.
#
#   bash mscoco/scripts/row.sh ROW METHOD [flags for both steps]       (the table1/ and table2/ scripts call it)
#
# ROW is the table's row label: a registered method's name (Table 1) or a variant's (Table 2, which then
# ranks into OUT/rankings/ROW). Environment: DATA (the release folder, required), OUT (results/mscoco),
# QUERIES (release: all 110; e.g. release:0-9), KS ("500 1000 4000"), COMPONENTS (SD2's vae/ and
# text_encoder/: a local folder or a mirror, the SD2 repositories having left the Hub), LAUNCH
# ("accelerate launch": every GPU of the machine; "python" for one process), PRESET (paper), EVAL_FLAGS
# (flags for the evaluation step only, e.g. "--reference released" or "--train.exclusion_mode zero").
# Cost: one retraining per (query, K), about 16 A100-hours each (PAPER.md), plus one reference model:
# 330 retrainings for all 110 queries, 30 for QUERIES=release:0-9. Resumable: rankings, models and
# metrics already made are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROW=$1 METHOD=$2
shift 2
: "${DATA:?set DATA to the release folder (bash mscoco/scripts/download.sh DATA)}"
OUT=${OUT:-results/mscoco}
read -ra KS <<< "${KS:-500 1000 4000}"
read -ra LAUNCH <<< "${LAUNCH:-accelerate launch}"
COMMON=(--data "$DATA" --components "${COMPONENTS:-stabilityai/stable-diffusion-2}" --queries "${QUERIES:-release}"
  --config mscoco/configs/mscoco.yaml --preset "${PRESET:-paper}")
read -ra EVAL_ONLY <<< "${EVAL_FLAGS:-}"
EVAL=(-m common.driver mscoco leave-k-out "${COMMON[@]}" --out "$OUT/leave_k_out" --attribution "$OUT/rankings" --eval.ks "${KS[@]}"
  "${EVAL_ONLY[@]}")
if [ "$METHOD" = random ]; then  # query-independent random sets, one per seed, made by the evaluation
  "${LAUNCH[@]}" "${EVAL[@]}" --methods random "$@"
elif [ "$ROW" = "$METHOD" ]; then
  "${LAUNCH[@]}" -m common.driver mscoco attribute "${COMMON[@]}" --out "$OUT/rankings" --method "$METHOD" --no-plot "$@"
  "${LAUNCH[@]}" "${EVAL[@]}" --methods "$METHOD" "$@"
else
  "${LAUNCH[@]}" -m common.driver mscoco attribute "${COMMON[@]}" --out "$OUT/rankings/$ROW" --method "$METHOD" --no-plot "$@"
  "${LAUNCH[@]}" "${EVAL[@]}" --methods --rankings "$ROW=$OUT/rankings/$ROW/$METHOD" "$@"
fi
