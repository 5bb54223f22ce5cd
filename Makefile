# Attention, Annotated: the two commands are `make site` and `make test`.
# Both create (once) and reuse a virtual environment in .venv with everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A machine without a GPU gets the CPU build of torch; one with a GPU gets pip's default (CUDA) build.
CPU_TORCH ?= torch==2.13.0
GPU_TORCH ?= torch>=2.4
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.py))

.PHONY: setup site test unit kernels lint nbval browser notebooks lab bench clean help

help:
	@echo "make site       build the site into site/_build/ (sets everything up first)"
	@echo "make test       unit tests, kernels, lint, nbval on every notebook, site build and browser check"
	@echo "make kernels    every Triton kernel under Triton's interpreter on the CPU, against its reference"
	@echo "make lint       ruff over the package, tests, notebooks and site generator"
	@echo "make notebooks  re-execute every notebook in place on the best device here"
	@echo "make lab        open JupyterLab on notebooks/"
	@echo "make bench      run the benchmark suites (python -m annotated_src.bench)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup: a GPU is present, installing $(GPU_TORCH)"; $(PY) -m pip install -q '$(GPU_TORCH)'; \
	else \
	  echo "setup: no GPU, installing the CPU build $(CPU_TORCH)"; $(PY) -m pip install -q '$(CPU_TORCH)'; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@# labml_nn, for the RETRO chapter's comparison with labml's implementation. Its declared
	@# requirements (torchtext, torchvision, fairscale) are not needed for that module, and
	@# torchtext and torchvision pin other torch releases, so it is installed without them.
	$(PY) -m pip install -q --no-deps 'labml-nn>=0.5'
	@touch $@

site: $(STAMP)
	$(PY) site/build.py

# The browser check needs Chromium; Debian's package provides /usr/bin/chromium.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "setup: installing Debian's chromium for the browser test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

unit: $(STAMP) browser
	$(PY) -m pytest tests -q -p no:cacheprovider

# Every Triton kernel, run by Triton's interpreter on CPU tensors and compared with its readable
# reference. TRITON_INTERPRET is read when a kernel is defined, so it is set for the whole run.
kernels: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -p no:cacheprovider -m kernel

lint: $(STAMP)
	$(PY) -m ruff check .

nbval: $(STAMP)
	$(PY) -m pytest $(NBVAL) notebooks -q -p no:cacheprovider

test: lint unit kernels nbval
	@echo "make test: all passed"

notebooks: $(STAMP)
	@for nb in $(NOTEBOOKS); do echo "executing $$nb"; \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m jupytext --set-kernel python3 --execute --to ipynb $$nb || exit 1; done

# JupyterLab on notebooks/, where the jupytext configuration lives: opening a .py shows the outputs
# of its .ipynb, and saving writes both. Root (as in a container) needs --allow-root.
LAB_OPTS ?=
lab: $(STAMP)
	cd notebooks && $(abspath $(PY)) -m jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_OPTS)

bench: $(STAMP)
	$(PY) -m annotated_src.bench --json bench-results.json

clean:
	rm -rf site/_build
