#!/bin/bash
# Issue 38's question: should make demo price its budget in llama.cpp latency? The demo preset with a llama.cpp
# latency budget removing 50% of the modules' prefill time (the params demo's shipped genome keeps 51% by the
# same table), in the scenario's store (same database, teachers and dense evaluation as the params demo there).
set -euo pipefail
cd /work/main
export DARWINLM_HOME=/tmp/scn/home
date -u +%FT%TZ
git rev-parse HEAD
/usr/bin/time -f "latency demo wall %e s" .venv/bin/darwinlm compress --preset smollm2-demo --budget-kind latency --latency-engine llama.cpp --fraction-removed 0.5 --store /tmp/scn/store --results /tmp/scn/latency-demo.json
date -u +%FT%TZ
