# The two commands a fresh clone needs:
#   make repro   set up .venv and run the default pipeline (dvc repro)
#   make test    set up .venv and run the test suite
# Everything runs inside .venv so `python` in dvc.yaml commands is the project's interpreter.

VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup repro test bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .   # the moe_prefetch package (its dependencies are pinned above)
	touch $@

repro: setup
	dvc repro

test: setup
	$(PY) -m pytest -q --durations=15 tests

bench: setup
	$(PY) benchmarks/run_all.py
