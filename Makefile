# Two commands do all set-up on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# This machine has a local CPU wheel of torch 2.13.0; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test env bench clean

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/ckptmap demo

test: env
	$(PY) -m pytest -q

bench: env
	$(PY) bench/bench_pt2ms.py

clean:
	rm -rf $(VENV) build *.egg-info
