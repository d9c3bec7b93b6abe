#!/usr/bin/env bash
# Table 2, SGD, 1 step (no Fisher), cross-attention K,V, step 0.001.
# The paper's tuned step size. Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" sgd-1 unlearning --unlearn.method sgd --unlearn.steps 1 --unlearn.step_size 0.001 "$@"
