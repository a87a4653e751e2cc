# The two commands a fresh clone needs:
#   make repro   set up .venv and run the default pipeline (dvc repro)
#   make test    set up .venv and run the test suite
# Everything runs inside .venv so `python` in dvc.yaml commands is the project's interpreter.

VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup repro test bench check-repro plots browser

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .   # the moe_prefetch package (its dependencies are pinned above)
	touch $@

repro: setup
	dvc repro

test: setup node_modules/.package-lock.json browser
	$(PY) -m pytest -q --durations=15 tests

# Debian's Chromium, for tests/test_plots_page.py (it renders the plots page headless); installed only when missing
# and only where apt-get can run as root: elsewhere the test skips, except under CI, where it fails.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; fi

bench: setup
	$(PY) benchmarks/run_all.py

check-repro: setup   # a fresh run's metrics vs the committed ones, within the cross-CPU tolerance (README: Reproducibility)
	dvc repro
	$(PY) scripts/check_metrics.py

# make plots: the `dvc plots show` page (dvc_plots/index.html), working offline: its template carries Vega, Vega-Lite
# and Vega-Embed inline from node_modules (scripts/plots_page.py) instead of DVC's CDN <script> tags. It is passed with
# --html-template, not set with `dvc config plots.html_template`: the template is built (git-ignored), and a committed
# config naming a file a fresh clone lacks would break a plain `dvc plots show`.
PLOTS_TEMPLATE := dvc_plots/template.html

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund

$(PLOTS_TEMPLATE): scripts/plots_page.py node_modules/.package-lock.json | $(VENV)/.installed
	$(PY) scripts/plots_page.py $@

plots: setup $(PLOTS_TEMPLATE)
	dvc plots show --html-template $(PLOTS_TEMPLATE)
