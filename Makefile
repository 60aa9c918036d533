# make run   : set up (venv, Docker engine, test image) and start the agent with config/agent.yaml
# make test  : the same set-up, then lint, types and the whole test suite
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/agent.yaml

.PHONY: setup host venv lint typecheck test unit run clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

host:
	bash scripts/ensure-host.sh

setup: venv host

lint: venv
	$(BIN)/ruff check agent tests
	$(BIN)/ruff format --check agent tests

typecheck: venv
	$(BIN)/mypy --strict agent

test: setup lint typecheck
	$(BIN)/pytest

unit: venv
	$(BIN)/pytest -m "not docker"

run: setup
	$(BIN)/drove-agent run --config $(CONFIG)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
