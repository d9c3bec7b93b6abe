#!/usr/bin/env bash
# Run-to-run stability on the tiny benchmark (docs/results/tiny_stability.md): each method twice,
# the two runs differing only in their seeds, compared by top-10 and top-100 overlap and Spearman
# (tiny.agreement); for unlearning, how stability, quality and cost change with the query draws
# (1k -> 10k -> 50k), the scoring timesteps (10 -> 20 -> 50) and averaging scores over seeds.
# Uses the leave-K-out model and the Table 2 queries (10 training images, 8 generated: run table2.sh first);
# the unlearning settings are Table 2's newton_kv (its chosen step size).
#
#   bash tiny/scripts/stability.sh [OUT_DIR]      (default: results/counterfactual)
#
# Resumable (finished query folders are reused). Writes OUT/stability/stability.md. Environment: PARTS
# (default "seeds draws timesteps average methods"), DEVICE (cpu), PRESET (leave_k_out), SWEEP_QUERIES
# (queries of the draw and timestep parts and of JourneyTRAK, default 4: the first 2 training images and
# 2 generated; the 1k-draw, 10-timestep seeds are compared on the same queries beside them), STAB_METHODS
# (the methods part's TRAK family, default "trak journey-trak d-trak").
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/counterfactual}
PRESET=${PRESET:-leave_k_out}
DEVICE=${DEVICE:-cpu}
CONFIG=tiny/configs/tiny.yaml
PARTS=${PARTS:-seeds draws timesteps average methods}
SWEEP=${SWEEP_QUERIES:-4}
TABLE=$OUT/table2
STAB=$OUT/stability

REPORT=$TABLE/newton_kv/report.json
[ -f "$REPORT" ] || { echo "error: $REPORT is missing: run tiny/scripts/table2.sh $OUT first" >&2; exit 1; }
read -r STEP PICKS < <(python -c "
import json; r = json.load(open('$REPORT')); print(r['settings']['unlearn']['step_size'], *r['self_picks'])")
read -ra PICKS <<< "$PICKS"
mkdir -p "$STAB"
[ -d "$STAB/generated_queries" ] || cp -r "$TABLE/generated_queries" "$STAB/generated_queries"

EVAL=(python -m common.driver tiny evaluate --model "$OUT/model" --data "$OUT/data" --out "$STAB" --config "$CONFIG"
  --preset "$PRESET" --device "$DEVICE" --guidance-scale 3)
UNLEARN=(--method unlearning --unlearn.step_size "$STEP")

evaluate() {  # TAG, queries (all or sweep), flags...
  local tag=$1 size=$2
  shift 2
  local sel=(--self-picks "${PICKS[@]}" --num-generated 8)
  [ "$size" = sweep ] && sel=(--self-picks "${PICKS[@]:0:$((SWEEP / 2))}" --num-generated $((SWEEP - SWEEP / 2)))
  echo "== $tag"
  "${EVAL[@]}" --tag "$tag" "${sel[@]}" "$@" 2> "$STAB/$tag.log" > "$STAB/$tag.md"
  sed -n 1p "$STAB/$tag.md"
}
seeds() { echo "--fisher.seed $1 --loss.seed $1 --unlearn.seed $1"; }
agree() {  # A B NAME [flags]
  python -m tiny.agreement "$STAB/$1" "$STAB/$2" --name "$3" "${@:4}" | tail -1 >> "$STAB/rows.md"
}

rm -f "$STAB/rows.md"
for PART in $PARTS; do
  case $PART in
    seeds)  # the Table 2 setting (1,000 draws, 10 timesteps), seeds 0 and 1; seed 0 is table2.sh's run
      [ -d "$STAB/kv-d1k-t10-s0" ] || cp -r "$TABLE/newton_kv" "$STAB/kv-d1k-t10-s0"
      for S in 0 1; do
        # shellcheck disable=SC2046
        evaluate "kv-d1k-t10-s$S" all "${UNLEARN[@]}" $(seeds "$S")
      done
      agree kv-d1k-t10-s0 kv-d1k-t10-s1 "unlearning, 1k draws, 10 timesteps" ;;
    draws)
      for S in 0 1; do
        # shellcheck disable=SC2046
        evaluate "kv-d10k-t10-s$S" sweep "${UNLEARN[@]}" --unlearn.accumulations 100 $(seeds "$S")
        # shellcheck disable=SC2046
        evaluate "kv-d50k-t10-s$S" sweep "${UNLEARN[@]}" --unlearn.accumulations 500 $(seeds "$S")
      done
      agree kv-d1k-t10-s0 kv-d1k-t10-s1 "unlearning, 1k draws, 10 timesteps (the same queries)" \
        --like "$STAB/kv-d10k-t10-s0"
      agree kv-d10k-t10-s0 kv-d10k-t10-s1 "unlearning, 10k draws, 10 timesteps"
      agree kv-d50k-t10-s0 kv-d50k-t10-s1 "unlearning, 50k draws, 10 timesteps" ;;
    timesteps)
      for S in 0 1; do
        # shellcheck disable=SC2046
        evaluate "kv-d1k-t20-s$S" sweep "${UNLEARN[@]}" --loss.num_timesteps 20 $(seeds "$S")
        # shellcheck disable=SC2046
        evaluate "kv-d1k-t50-s$S" sweep "${UNLEARN[@]}" --loss.num_timesteps 50 $(seeds "$S")
      done
      agree kv-d1k-t20-s0 kv-d1k-t20-s1 "unlearning, 1k draws, 20 timesteps"
      agree kv-d1k-t50-s0 kv-d1k-t50-s1 "unlearning, 1k draws, 50 timesteps" ;;
    average)  # scores averaged over seeds {0, 1} against {2, 3}
      for S in 2 3; do
        # shellcheck disable=SC2046
        evaluate "kv-d1k-t10-s$S" all "${UNLEARN[@]}" $(seeds "$S")
      done
      python -m tiny.average --data "$OUT/data" --out "$STAB/kv-d1k-t10-s01" "$STAB/kv-d1k-t10-s0" "$STAB/kv-d1k-t10-s1"
      python -m tiny.average --data "$OUT/data" --out "$STAB/kv-d1k-t10-s23" "$STAB/kv-d1k-t10-s2" "$STAB/kv-d1k-t10-s3"
      agree kv-d1k-t10-s01 kv-d1k-t10-s23 "unlearning, 1k draws, 10 timesteps, mean of 2 seeds" ;;
    methods)  # the other methods' seeds: TRAK's noise draws and projection
      for M in ${STAB_METHODS:-trak journey-trak d-trak}; do
        F=${M//-/_}
        SIZE=all
        [ "$M" = journey-trak ] && SIZE=sweep  # 100-200 s per query (a pass per trajectory step)
        for S in 0 1; do
          evaluate "$M-s$S" "$SIZE" --method "$M" "--$F.seed" "$S"
        done
        agree "$M-s0" "$M-s1" "$M"
      done
      for S in 0 1; do evaluate "random-s$S" all --method random --random.seed "$S"; done
      agree random-s0 random-s1 "random" ;;
    *) echo "unknown part $PART" >&2; exit 2 ;;
  esac
done
{ echo "| runs | queries | top-10 overlap | top-100 overlap | Spearman |"; echo "|---|---|---|---|---|"
  cat "$STAB/rows.md"; } > "$STAB/stability.md"
cat "$STAB/stability.md"
