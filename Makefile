# The two commands of the README:
#   make demo   -- set-up + the CPU demo on the embedded corpus (OUT=demo_out)
#   make test   -- set-up + the default test suite (what .ci/run calls)
# Set-up is a virtual environment in .venv: torch first (the CPU build from a pinned
# version; an unpinned torch would pull a multi-GB CUDA build), then the project with the
# versions in ci/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
OUT ?= demo_out
BIN := $(VENV)/bin
STAMP := $(VENV)/.megafire-installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-all
setup: $(STAMP)

$(STAMP): pyproject.toml ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c ci/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/megafire demo --out $(OUT)

test: setup
	bash ci/test.sh

# everything, slow tests included (GPU tests still skip without CUDA)
test-all: setup
	bash ci/test.sh -m "not gpu"
