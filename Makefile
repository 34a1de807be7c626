# make test: set up .venv (if missing) and run the default test suite.
# make demo: same set-up, then the end-to-end CPU demo (`sftrl demo`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: setup test test-slow demo lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $(RUNTIME_STAMP)

# The demo needs only the runtime dependencies (no torch, pytest, ...): a faster first `make demo`.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(RUNTIME_STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

demo: $(RUNTIME_STAMP)
	$(BIN)/sftrl demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python tools/bench.py verifier
	$(BIN)/python tools/bench.py sampler
	$(BIN)/python tools/bench.py sft

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
