#!/usr/bin/env bash
# The tiny LDS table: the linear datamodeling score of each method's rankings (common.evaluation.lds) on the
# leave-K-out recipe. COUNT random subsets of FRACTION of the training set, a model trained from scratch on each with
# SEEDS training seeds (the recipe's seed, +1, ...), each query's loss on each model, and per method the Spearman
# correlation between a subset's summed scores and the query's negative loss (mean ± SE over queries, bootstrap
# interval over subsets, p-value against relabelled images). Resumable: every model, measured loss and ranking is
# kept; rerun after an interruption. COUNT may be raised in a later run (the first subsets of a seed are the same for
# every COUNT; their models are reused) or lowered (the table of the first COUNT). Measured: docs/results/tiny_lds.md.
#
#   bash tiny/scripts/lds.sh [OUT_DIR]      (default: results/counterfactual)
#
# Uses OUT's model, data, queries and attribution/ (counterfactual.sh's layout; made the same way when missing), so
# the queries and rankings are the leave-K-out table's. Writes OUT/lds/{lds.md, lds.json, subsets/, outputs/, models/}.
# A model of the 500-image recipe takes about 150-220 s on a 2-core CPU: 64 subsets x 1 seed is about 3.5 hours.
# Environment: COUNT (64), FRACTION (0.5), SEEDS (1; D-TRAK used 3), METHODS (registered methods, default
# "unlearning pixel random text-condition trak journey-trak d-trak"), RANKINGS (LABEL=FOLDER rankings made
# elsewhere, e.g. an unlearning variant's attribution/unlearning), PRESET (leave_k_out), DEVICE (cpu), QUERIES (a
# queries folder made elsewhere), NUM_QUERIES (8), NUM_IMAGES (500).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-leave_k_out}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
read -ra EXTRA <<< "${RANKINGS:-}"

[ -f "$OUT/data/metadata.jsonl" ] || python -m tiny.shapes --out "$OUT/data" --num-images "${NUM_IMAGES:-500}"
python -m tiny.train --data "$OUT/data" --out "$OUT/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
QUERIES=${QUERIES:-$OUT/queries}
[ -d "$QUERIES" ] || python -m common.driver tiny generate --model "$OUT/model" --out "$QUERIES" \
  --num "${NUM_QUERIES:-8}" --guidance-scale 3 --num-steps 250
# shellcheck disable=SC2086
python -m common.driver tiny lds --model "$OUT/model" --data "$OUT/data" --queries "$QUERIES" \
  --attribution "$OUT/attribution" --out "$OUT/lds" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE" \
  --methods ${METHODS:-unlearning pixel random text-condition trak journey-trak d-trak} \
  ${EXTRA[@]:+--rankings "${EXTRA[@]}"} \
  --lds.count "${COUNT:-64}" --lds.fraction "${FRACTION:-0.5}" --lds.seeds "${SEEDS:-1}"
