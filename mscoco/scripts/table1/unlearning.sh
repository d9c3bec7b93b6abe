#!/usr/bin/env bash
# Table 1, Unlearning (ours; also Table 2's "cross-attn K,V" row): one Newton step, alpha = 0.01, with the
# released Fisher (DATA/fisher_info.pt). Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" unlearning unlearning --fisher.file "${DATA:?set DATA}/fisher_info.pt" "$@"
