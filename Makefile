# The README's quick start is `make run` and `make test`; both set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test proto lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/llm-gateway

# The Debian packages the tests need first: installed as root on Debian, else named in one line.
test: setup
	bash tools/system-deps.sh
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m bench

proto: setup
	$(BIN)/python tools/gen_proto.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
