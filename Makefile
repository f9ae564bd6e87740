# Two commands for a newcomer (README):
#   make demo   set up the venv (idempotent) and run pretrain -> fine-tune -> evaluate on built-in data
#   make test   set up the venv (idempotent) and run the test suite
#   make test-fast   the suite without its slow tier (multi-process and real training runs)
# REGIONSSL_VENV (also read by scripts/setup_env.sh) puts the venv elsewhere, e.g. one shared by clones
VENV ?= $(or $(REGIONSSL_VENV),.venv)
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup_env.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(PY) -m pytest -q tests

test-fast: setup
	@$(PY) -m pytest -q -m "not slow" tests

bench: setup
	@$(PY) bench/run_all.py
