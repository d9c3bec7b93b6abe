#!/usr/bin/env bash
# Table 1, DINOv2 ViT-L/14 with registers: cosine similarity of image features, max over flips.
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" dinov2 dinov2 "$@"
