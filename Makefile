# `make test` and `make demo` bootstrap .venv on a fresh machine (only Python 3.11 needed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_SCALE ?= small
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo clean-demo bench

venv: $(VENV)/.installed

# torch is pinned first: an unpinned torch (or one pulled by another package's isolated build)
# would download a multi-GB CUDA build. deepspeed is built against that torch (no isolation).
$(VENV)/.installed: pyproject.toml scripts/bootstrap_torchaudio.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q -e '.[dev]'
	$(PY) scripts/bootstrap_torchaudio.py
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that launch Ray clusters or DeepSpeed processes.
test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv
	DEMO_SCALE=$(DEMO_SCALE) bash scripts/demo.sh

bench: venv
	$(VENV)/bin/musiclm bench shards

clean-demo:
	rm -rf data/rapbeats shards/rapbeats runs/demo models/demo
