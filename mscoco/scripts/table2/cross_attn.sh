#!/usr/bin/env bash
# Table 2, Newton on all cross-attention weights, alpha = 0.005.
# The paper's tuned step size; the released Fisher covers every weight. Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" newton-cross-attn unlearning --fisher.file "${DATA:?set DATA}/fisher_info.pt" --unlearn.selection cross-attn --fisher.selection cross-attn --unlearn.step_size 0.005 "$@"
