# corral: `make run` starts a broker with a worker; `make test` runs the whole suite;
# `make bench` compares corral with its peers.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
EVENTMQ := eventmq==0.3.13
# The peers corral is benchmarked against live in their own environment, never in corral's.
BENCH_VENV := .venv-bench

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	# EventMQ pins a pyzmq that no longer builds; its real dependencies come from the test extra.
	$(BIN)/pip install --quiet --no-deps $(EVENTMQ)
	@touch $@

run: $(VENV)/.installed
	$(BIN)/corral up

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements.txt
	$(BENCH_VENV)/bin/pip install --quiet --no-deps $(EVENTMQ)
	@touch $@

bench: $(VENV)/.installed-test $(BENCH_VENV)/.installed
	$(BIN)/python -m bench

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache build src/*.egg-info
