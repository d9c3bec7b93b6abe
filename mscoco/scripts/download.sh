#!/usr/bin/env bash
# Download, extract and check the MSCOCO benchmark (the authors' release on the Hugging Face Hub, then
# COCO 2017 train images and captions). Resumable: a rerun skips what is complete.
#
#   bash mscoco/scripts/download.sh DATA_DIR [release|coco ...]      (default: both)
#
# Already have the archives (model_fisher.7z, sample.7z, latents_text_embeddings.7z.001, ...)?
#   ARCHIVES=/path/to/them bash mscoco/scripts/download.sh DATA_DIR release
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: bash mscoco/scripts/download.sh DATA_DIR [release|coco ...]" >&2; exit 2; }
OUT=$1
shift
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(release coco)
python -m mscoco.download --out "$OUT" --parts "${PARTS[@]}" ${ARCHIVES:+--archives "$ARCHIVES"}
