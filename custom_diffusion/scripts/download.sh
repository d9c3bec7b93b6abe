#!/usr/bin/env bash
# Download, extract and check the customized-model (AbC) benchmark: the Hugging Face Hub datasets
# sywang/GenDataAttribution (exemplars, synthesized test images, Custom Diffusion models, benchmark
# JSONs) and sywang/AttributeByUnlearning (abc/: LAION latents and text embeddings, sd_fisher.pt), and
# the unlearning release's task lists. Resumable: a rerun skips what is complete.
#
#   bash custom_diffusion/scripts/download.sh DATA_DIR [all|demo|test_observed_imagenet|test_unobserved_imagenet|test_bamfg|test_artchive]
#
# The selection (default all) limits what is extracted to the files its tasks use; the archives hold every
# test case, so the download is the same: ~245 GB of archives (exemplars 17, synthesized images 78,
# models ~150) plus the LAION arrays, whose size the hub listing did not show.
# Environment: LAION_IMAGES=1 also fetches the LAION images and captions (~270 GB, for looking at neighbours);
# LAION_CAPTIONS=1 only their captions (for clip-text; extracted from the same ~270 GB archive, then deleted);
# ARCHIVES=/path extracts hub files already on disk (same layout); KEEP_ARCHIVES=1 keeps the volumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: bash custom_diffusion/scripts/download.sh DATA_DIR [all|demo|TEST_CASE]" >&2; exit 2; }
export HF_HUB_ENABLE_HF_TRANSFER=${HF_HUB_ENABLE_HF_TRANSFER:-0}
FLAGS=()
[ -n "${ARCHIVES:-}" ] && FLAGS+=(--archives "$ARCHIVES")
[ "${LAION_IMAGES:-0}" = 1 ] && FLAGS+=(--laion-images)
[ "${LAION_CAPTIONS:-0}" = 1 ] && FLAGS+=(--laion-captions)
[ "${KEEP_ARCHIVES:-0}" = 1 ] && FLAGS+=(--keep-archives)
python -m custom_diffusion.download --out "$1" --select "${2:-all}" "${FLAGS[@]}"
