# Two commands do all set-up on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# This machine has a local CPU wheel of torch 2.13.0; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test env bench clean mcore-versions

# uv installs the same pinned set in ~20 s where pip takes ~2 min (parallel downloads, no
# per-package resolver round trips); it reads no pip config, so the local wheel dir is passed on.
UV_PIN ?= uv==0.9.0
UV      = $(VENV)/bin/uv
UV_PIP  = $(UV) pip install --quiet --python $(PY) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(UV_PIN)
	$(UV_PIP) $(TORCH_PIN) -r requirements-dev.txt
	$(UV_PIP) --no-deps -e .
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/ckptmap demo

# Several megatron-core versions side by side for tests/mcore_versions: one --target dir each
# (seconds to install, cached by a stamp), not one venv each.
include tests/mcore_versions/versions.mk
MCORE_DIR = $(VENV)/mcore

$(MCORE_DIR)/%/.installed: tests/mcore_versions/versions.mk | $(VENV)/.installed
	rm -rf $(MCORE_DIR)/$*
	$(UV_PIP) --no-deps --target $(MCORE_DIR)/$* megatron-core==$* $(MCORE_EXTRA_$*)
	touch $@

mcore-versions: $(foreach v,$(MCORE_VERSIONS),$(MCORE_DIR)/$(v)/.installed)

# Two pytest-xdist workers, one test file per worker at a time (module fixtures convert once); the
# real megatron-core runs are generated once per version under a lock and shared through their cache.
TEST_WORKERS ?= 2
test: env mcore-versions
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: env
	$(PY) bench/bench_pt2ms.py

clean:
	rm -rf $(VENV) build *.egg-info
