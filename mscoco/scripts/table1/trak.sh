#!/usr/bin/env bash
# Table 1, TRAK: d = 4,096; the paper ensembles 20 models: pass --trak.ensemble with 19 more (mscoco.train --train.seed 1..19).
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" trak trak "$@"
