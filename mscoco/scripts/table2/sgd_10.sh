#!/usr/bin/env bash
# Table 2, SGD, 10 steps (no Fisher), cross-attention K,V, step 0.0001.
# The paper's tuned step size. Environment and cost: mscoco/scripts/row.sh.
exec bash "$(dirname "$0")/../row.sh" sgd-10 unlearning --unlearn.method sgd --unlearn.steps 10 --unlearn.step_size 0.0001 "$@"
