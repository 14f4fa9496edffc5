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

.PHONY: install lab test test-unit test-notebooks test-browser browser-deps notebooks bench binder-check lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks

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

binder-check:
	bash binder/check.sh

lint: install
	test -x $(BIN)/ruff || $(PIP) ruff
	$(BIN)/ruff check nbderiv tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
