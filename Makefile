# Entry points. `make demo` and `make test` set the machine up first (seconds when it is ready).
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/darwinlm compress --preset smollm2-demo --results bench/results/demo.json

test: setup
	.venv/bin/python -m pytest -q

# The same suite without the whole-compression (integration) tests: a minute or two, for the edit-test loop.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not integration"
