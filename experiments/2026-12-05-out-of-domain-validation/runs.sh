#!/bin/sh
# The demo preset's shipped model, its informed start and uniform, each after the pipeline's own refit and
# post-training, read on the validation windows of every evaluation set (issue 39). Zero-shot tasks are skipped:
# they read SOTU only and cost ~8 min a run. Run from the repository root; each run writes its summary here.
set -e
here=experiments/2026-12-05-out-of-domain-validation
store=${STORE:-/tmp/ood/store}
run() {
    name=$1; shift
    .venv/bin/darwinlm compress --preset smollm2-demo --store "$store" --set evaluate.tasks= \
        --results "$here/runs/$name.json" "$@" > "$here/runs/$name.log" 2>&1
}
mkdir -p "$here/runs"
run searched-seed0 --seed 0
run informed-start --generations 0
run uniform --start uniform --generations 0
run searched-seed1 --seed 1
run searched-seed2 --seed 2
