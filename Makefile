# The two commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs, so a fresh Debian-like machine with Python 3.10+ is enough.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on disk on our machines; an unpinned torch pulls CUDA.
TORCH  := torch==2.13.0

.PHONY: demo test lint typecheck unit bench clean

$(VENV)/.dev-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.sim-installed: $(VENV)/.dev-installed
	$(PY) -m pip install -q '$(TORCH)' -e '.[dev,sim,probe]'
	touch $@

demo: $(VENV)/.sim-installed
	$(VENV)/bin/sentinel demo

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check sentinel tests bench
	$(PY) -m ruff format --check sentinel

# mypy follows the probe and the test worker into torch and transformers.
typecheck: $(VENV)/.sim-installed
	$(PY) -m mypy

# The probe and test-worker tests need torch: under CI=true they must run, not skip.
unit: $(VENV)/.sim-installed
	$(PY) -m pytest -q

test: lint typecheck unit

bench: $(VENV)/.sim-installed
	for b in store_bench overhead scrape_bench log_ingest rules_eval subquery event_to_alert alert_to_action notify_latency probe_overhead race; do \
		echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
