#!/bin/bash
# Issue 38's open question: do the aligned ladders cost quality? The demo preset with the ladders of before
# (mlp_alignment 1, uneven KV groups allowed), in the scenario's store (same teachers and dense evaluation).
set -euo pipefail
cd /work/main
export DARWINLM_HOME=/tmp/scn/home
while pgrep -f "latency-demo.sh" > /dev/null; do sleep 10; done
date -u +%FT%TZ
git rev-parse HEAD
/usr/bin/time -f "unaligned demo wall %e s" .venv/bin/darwinlm compress --preset smollm2-demo --set database.mlp_alignment=1 --set database.even_kv_groups=false --store /tmp/scn/store --results /tmp/scn/unaligned-demo.json
date -u +%FT%TZ
