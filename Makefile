# `make test` and `make demo` bootstrap .venv on a fresh machine (only Python 3.11 needed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
TORCH_VERSION ?= 2.13.0
UV_VERSION    ?= 0.13.9
LOCK   := requirements.lock
DEMO_SCALE ?= small
PYTEST_ARGS ?=
# uv does not read pip's configuration: pass on the wheel folders pip is told about (a local
# wheelhouse, e.g. the CPU torch on this kind of machine), from `pip config` or $PIP_FIND_LINKS.
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_LINKS := $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))

.PHONY: venv lock lint test test-fast demo clean-demo bench

venv: $(VENV)/.installed

# No dependency resolution on a user's machine: every package but torch is pinned in $(LOCK)
# (`make lock` refreshes it) and installed by uv (seconds, where pip backtracks through ray wheels
# for ~15 min). torch is pinned and installed first, by pip: an unpinned torch (or one pulled by
# another package's build) would download a multi-GB CUDA build where a CPU one is configured.
# deepspeed is built against that torch (no build isolation). Bytecode is compiled at install:
# every training process imports torch, deepspeed and transformers, and without .pyc files (or
# with PYTHONDONTWRITEBYTECODE set) each start-up would compile them again.
$(VENV)/.installed: $(LOCK) pyproject.toml scripts/bootstrap_torchaudio.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION) uv==$(UV_VERSION)
	$(UV) pip install --python $(PY) -q --compile-bytecode $(UV_LINKS) \
	  --no-build-isolation-package deepspeed -r $(LOCK)
	$(UV) pip install --python $(PY) -q --no-deps -e .
	$(PY) scripts/bootstrap_torchaudio.py
	touch $@

# Re-resolve pyproject.toml into $(LOCK) (commit the result). Resolved against the CPU torch wheel,
# so no CUDA libraries enter the lock; torch itself is left out (see above).
lock:
	test -x $(UV) || { $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q uv==$(UV_VERSION); }
	echo "torch==$(TORCH_VERSION)+cpu" > $(VENV)/torch-cpu.txt
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 $(UV_LINKS) \
	  --index-strategy unsafe-best-match --override $(VENV)/torch-cpu.txt --no-emit-package torch \
	  --no-header --quiet -o $(LOCK)

lint: venv
	$(VENV)/bin/ruff check musiclm ray_jobs launch scripts tests
	$(VENV)/bin/ruff format --check musiclm ray_jobs launch scripts tests

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
