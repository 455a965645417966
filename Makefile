# pixelmill: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export SPARK_LOCAL_IP ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench dist clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

bench: setup
	bash bench/run_all

dist: setup
	bash scripts/dist.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache work
