#!/bin/sh
# Half the search: the demo preset with 25 generations instead of 50, seeds 0-2, after the same refit and
# post-training, read on the same validation windows as runs.sh's runs (issue 39: a demo within 15 minutes).
set -e
here=experiments/2026-12-05-out-of-domain-validation
store=${STORE:-/tmp/ood/store}
for seed in 0 1 2; do
    .venv/bin/darwinlm compress --preset smollm2-demo --store "$store" --set evaluate.tasks= --generations 25 \
        --seed $seed --results "$here/runs/searched-25-seed$seed.json" > "$here/runs/searched-25-seed$seed.log" 2>&1
done
