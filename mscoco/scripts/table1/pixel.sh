#!/usr/bin/env bash
# Table 1, Pixel: cosine similarity of the decoded 128-px images, max over flips.
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" pixel pixel "$@"
