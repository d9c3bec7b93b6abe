#!/usr/bin/env bash
# Table 1, D-TRAK: one model, d = 32,768, lambda = 500, output ||eps||^2.
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" d-trak d-trak "$@"
