#!/usr/bin/env bash
# Table 1, Random: 3 random removal sets per K, shared by every query.
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" random random "$@"
