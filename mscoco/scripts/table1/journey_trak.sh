#!/usr/bin/env bash
# Table 1, JourneyTRAK: d = 4,096 along each query's sampling trajectory; 20 models in the paper (--journey_trak.ensemble).
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" journey-trak journey-trak "$@"
