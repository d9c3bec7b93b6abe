#!/usr/bin/env bash
# Table 2, Newton on every weight, alpha = 0.0005.
# The paper's tuned step size; the released Fisher covers every weight. Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" newton-all unlearning --fisher.file "${DATA:?set DATA}/fisher_info.pt" --unlearn.selection all --fisher.selection all --unlearn.step_size 0.0005 "$@"
