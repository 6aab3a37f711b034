# Entry points. `make demo` and `make test` set the machine up first (seconds when it is ready).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/darwinlm compress --preset smollm2-demo --results bench/results/demo.json

test: setup
	.venv/bin/python -m pytest -q
