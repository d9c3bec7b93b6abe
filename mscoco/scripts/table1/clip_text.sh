#!/usr/bin/env bash
# Table 1, CLIP text: the query's prompt against each image's captions (OpenAI ViT-B/32 text tower).
# Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" clip-text clip-text "$@"
