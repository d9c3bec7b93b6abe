#!/usr/bin/env bash
# The follow-up's AbU+ row (FastGDA, NeurIPS 2025; PAPER.md §6): one Newton step, alpha = 0.01, with EK-FAC
# curvature (preset paper_ekfac). EKFAC: a factor folder in kronfluence's layout, FastGDA's released
# coco/ekfac_fisher (Hub dataset sywang/FastGDA) or one fitted here:
#   accelerate launch -m common.driver mscoco attribute --data DATA --out OUT/rankings/unlearning-ekfac --method unlearning \
#     --config mscoco/configs/mscoco.yaml --preset paper_ekfac --prepare-only
# (then EKFAC=OUT/rankings/unlearning-ekfac/cache/unlearning/ekfac; 2 x 100,000 forward-backward passes, no
# per-sample vmap: by the training cost of PAPER.md §3, about 10 A100-minutes, not yet measured on a GPU).
# With our own factors tune --unlearn.step_size at --unlearn.num_train 118287 (mscoco/configs/mscoco.yaml).
# Environment and cost of the row: mscoco/scripts/row.sh.
export PRESET=${PRESET:-paper_ekfac}
exec bash "$(dirname "$0")/../row.sh" unlearning-ekfac unlearning --unlearn.preconditioner ekfac \
  --fisher.file "${EKFAC:?set EKFAC to an EK-FAC factor folder (see this script)}" "$@"
