# make run   : set up (venv, Docker engine, test image) and start the agent with config/agent.yaml
# make test  : the same set-up, then lint, types and the whole test suite
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/agent.yaml

.PHONY: setup host venv lint typecheck test unit run clean install bench fuzz soak

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
	$(BIN)/ruff check agent tests bench
	$(BIN)/ruff format --check agent tests bench

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

# Install as a systemd service: the agent in /opt/drove-agent, the unit, a config to edit.
install:
	python3 -m venv /opt/drove-agent
	/opt/drove-agent/bin/pip install -q .
	ln -sf /opt/drove-agent/bin/drove-agent /usr/local/bin/drove-agent
	install -m 0644 systemd/drove-agent.service /etc/systemd/system/drove-agent.service
	install -d /etc/drove-agent
	[ -f /etc/drove-agent/agent.yaml ] || install -m 0640 config/agent.yaml /etc/drove-agent/agent.yaml
	@echo "now: systemctl daemon-reload && systemctl enable --now drove-agent"

# Benchmarks, fuzzing and the soak test (not part of make test); see docs/benchmarks.md.
bench: setup
	$(BIN)/python bench/bench.py

fuzz: setup
	FUZZ_EXAMPLES=12000 $(BIN)/pytest -q -p no:cacheprovider tests/fuzz

soak: setup
	$(BIN)/python bench/soak.py
