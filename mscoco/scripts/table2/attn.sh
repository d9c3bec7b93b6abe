#!/usr/bin/env bash
# Table 2, Newton on all attention (self and cross), alpha = 0.005.
# The paper's tuned step size; the released Fisher covers every weight. Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" newton-attn unlearning --fisher.file "${DATA:?set DATA}/fisher_info.pt" --unlearn.selection attn --fisher.selection attn --unlearn.step_size 0.005 "$@"
