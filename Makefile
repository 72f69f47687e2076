# One command to set up and demo, one to set up and test; everything else is a convenience.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint test-rust test-python test-fast bench clean

setup: $(STAMP)

# Rebuilds the Rust extension whenever the crate or the packaging changes.
$(STAMP): pyproject.toml Cargo.toml rust_sampler/Cargo.toml $(wildcard rust_sampler/src/*.rs)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/lmtools demo

test: setup lint test-rust test-python

# Style and lint gates: ruff (rules and formatting, configured in pyproject.toml) and clippy.
lint: setup
	$(BIN)/ruff check lmtools tests benchmarks
	$(BIN)/ruff format --check lmtools tests benchmarks
	PYO3_PYTHON=$(BIN)/python cargo clippy -p rust_sampler --all-targets --all-features -- -D warnings

test-rust:
	cargo test -p rust_sampler

test-python: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,ops

clean:
	rm -rf $(VENV) target .pytest_cache .hypothesis .benchmarks
