#!/usr/bin/env bash
# Attribution by unlearning, end to end on the tiny benchmark (2 CPU cores: 8-17 min measured):
# build the shapes dataset, train the tiny model (or reuse it), generate queries, estimate the
# Fisher, cache the pretrained losses, attribute each query.
#
#   bash scripts/quickstart.sh [OUT_DIR]        (default: results/quickstart)
#
# Then the fast path beside it (preset FAST_PRESET) and how far it agrees with the exact rankings.
#
# Environment: NUM_QUERIES (default 4), PRESET (default "default"), FAST_PRESET (default "fast"), DEVICE (default auto).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/quickstart}
NUM_QUERIES=${NUM_QUERIES:-4}
PRESET=${PRESET:-default}
FAST_PRESET=${FAST_PRESET:-fast}
DEVICE=${DEVICE:-auto}
CONFIG=tiny/configs/tiny.yaml

python -c "import importlib.metadata as m, torch, diffusers, open_clip; m.version('attribute-by-unlearning')" \
  2>/dev/null || pip install -e .

stage() { echo; echo "== $1"; START=$(date +%s); }
done_stage() { echo "   ($1: $(( $(date +%s) - START )) s)"; }

stage "dataset"
if [ ! -f "$OUT/data/metadata.jsonl" ]; then
  python -m tiny.shapes --out "$OUT/data" --num-images "${NUM_IMAGES:-2000}"
else
  echo "reusing $OUT/data"
fi
done_stage dataset

stage "train the tiny model"
python -m tiny.train --data "$OUT/data" --out "$OUT/model" --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
done_stage train

stage "generate queries"
if [ ! -d "$OUT/queries" ]; then
  python -m common.driver tiny generate --model "$OUT/model" --out "$OUT/queries" --num "$NUM_QUERIES" --guidance-scale 3
else
  echo "reusing $OUT/queries"
fi
done_stage generate

stage "attribute (Fisher, pretrained losses, unlearning, scoring)"
python -m common.driver tiny attribute --model "$OUT/model" --data "$OUT/data" --queries "$OUT/queries" --out "$OUT/attribution" \
  --config "$CONFIG" --preset "$PRESET" --device "$DEVICE"
done_stage attribute

stage "the fast path (preset $FAST_PRESET: unlearning re-scores the top 20% of pixel similarity and the text condition)"
python -m common.driver tiny attribute --model "$OUT/model" --data "$OUT/data" --queries "$OUT/queries" --out "$OUT/attribution" \
  --config "$CONFIG" --preset "$FAST_PRESET" --device "$DEVICE" --tag unlearning-fast
python -m common.evaluation.fast_paths --exact "$OUT/attribution/unlearning" \
  --runs "fast ($FAST_PRESET)=$OUT/attribution/unlearning-fast" --out "$OUT/attribution/fast_vs_exact.md"
done_stage fast

stage "the gallery (each query beside both rankings)"
python -m common.gallery "$OUT/attribution"
done_stage gallery

echo
echo "Done. Per query: $OUT/attribution/unlearning/<id>/{ranking.json,scores.npy,config.json,top10.png}"
echo "The fast path's: $OUT/attribution/unlearning-fast/<id>/..., against exact in $OUT/attribution/fast_vs_exact.md"
echo "To look at them: open $OUT/attribution/gallery/index.html in a browser"
ls "$OUT"/attribution/unlearning/*/top10.png
