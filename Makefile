# nbderiv — every set-up step lives here, so a fresh machine with only Python needs
# nothing but `make lab` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nbderiv-installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# TensorFlow's C++ start-up lines would otherwise land in notebook outputs.
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_ENABLE_ONEDNN_OPTS ?= 0
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
# PyTorch's CPU wheels (torch X+cpu outranks PyPI's X, the CUDA build on Linux). Asked only when
# reachable: an unreachable extra index costs pip retries for every package it looks up.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# `make lab`: JupyterLab refuses to run as root without --allow-root (containers, CI, cloud VMs).
LAB_ARGS ?=
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: install lab test test-unit test-notebooks test-browser browser-deps notebooks bench bench-real binder-check lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" >/dev/null 2>&1; then \
	  echo "PyTorch: the CPU build, from $(TORCH_CPU_INDEX) (an extra index for pip)"; \
	  extra="--extra-index-url $(TORCH_CPU_INDEX)"; \
	else \
	  echo "PyTorch: $(TORCH_CPU_INDEX) is out of reach; torch comes from pip's own indexes (see README)"; \
	  extra=""; \
	fi; \
	echo "$(PIP) $$extra -e .[all]"; \
	$(PIP) $$extra -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

lab: install
	@echo "JupyterLab on notebooks/: open the http://127.0.0.1:PORT/lab?token=... address it prints below; Ctrl-C stops it."
	$(BIN)/jupyter lab notebooks $(LAB_ROOT) $(LAB_ARGS)

test: install browser-deps
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest --doctest-modules nbderiv -q
	$(BIN)/python -m pytest $(NBVAL) notebooks -q

test-unit: install
	$(BIN)/python -m pytest tests -q -m "not browser"
	$(BIN)/python -m pytest --doctest-modules nbderiv -q

test-notebooks: install
	$(BIN)/python -m pytest $(NBVAL) notebooks -q

test-browser: install browser-deps
	$(BIN)/python -m pytest tests/browser -q

# Debian's Chromium for the JupyterLab browser test (never a downloaded browser build).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "WARNING: could not install chromium; the browser test will be skipped"; \
	  else echo "WARNING: chromium is missing and cannot be installed here (not root); the browser test will be skipped"; fi; }

notebooks: install
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False notebooks/*.ipynb

bench: install
	$(BIN)/python benchmarks/run.py

bench-real: install
	$(BIN)/python benchmarks/real_models.py

binder-check:
	bash binder/check.sh

lint: install
	test -x $(BIN)/ruff || $(PIP) ruff
	$(BIN)/ruff check nbderiv tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
