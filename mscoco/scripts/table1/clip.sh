#!/usr/bin/env bash
# Table 1, CLIP ViT-B/32: cosine similarity of image features, max over flips.
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" clip clip "$@"
