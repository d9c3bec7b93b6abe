#!/usr/bin/env bash
# The linear datamodeling score on MSCOCO (README "Leave-K-out evaluation", common.evaluation.lds): COUNT random
# subsets of FRACTION of the training set (drawn from a seed, stored), the paper's recipe retrained from scratch on
# each with SEEDS training seeds, each query's loss on each model (the same fixed noise as ΔL), and the LDS of every
# ranking: the methods named (ranked now into OUT/rankings when missing) and RANKINGS made elsewhere.
#
#   bash mscoco/scripts/lds.sh [METHOD ...]       (default: unlearning d-trak dino pixel)
#
# Environment: DATA (the release folder, required), OUT (results/mscoco; writes OUT/lds), QUERIES (release: all 110),
# COUNT (64), FRACTION (0.5), SEEDS (1; D-TRAK used 3), RANKINGS (LABEL=FOLDER ...), COMPONENTS, LAUNCH
# ("accelerate launch"), PRESET (paper).
# Cost: a subset model trains the recipe's 184,824 steps of batch 128 whatever the subset's size, about 16
# A100-hours (PAPER.md), so 64 subsets x 1 seed are about 1,000 A100-hours and D-TRAK's 64 x 3 about 3,100.
# Resumable: subsets, models, measured losses and rankings already made are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to the release folder (bash mscoco/scripts/download.sh DATA)}"
OUT=${OUT:-results/mscoco}
read -ra LAUNCH <<< "${LAUNCH:-accelerate launch}"
read -ra EXTRA <<< "${RANKINGS:-}"
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(unlearning d-trak dino pixel)
"${LAUNCH[@]}" -m common.driver mscoco lds --data "$DATA" --components "${COMPONENTS:-stabilityai/stable-diffusion-2}" \
  --queries "${QUERIES:-release}" --config mscoco/configs/mscoco.yaml --preset "${PRESET:-paper}" \
  --attribution "$OUT/rankings" --out "$OUT/lds" --methods "${METHODS[@]}" ${EXTRA[@]:+--rankings "${EXTRA[@]}"} \
  --lds.count "${COUNT:-64}" --lds.fraction "${FRACTION:-0.5}" --lds.seeds "${SEEDS:-1}"
