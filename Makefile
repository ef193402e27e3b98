# ModelPort: `make run` starts the portal, `make test` runs every check.
# Both set up everything they need on a fresh machine (a virtualenv under .venv).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# Reinstall only when pyproject.toml changes.
HASH   := $(shell sha256sum pyproject.toml | cut -c1-12)

# Services the tests use (started by tests/ensure_services.sh when missing).
TEST_DATABASE_URL ?= postgres://modelport:modelport@127.0.0.1:5432/modelport
TEST_BROKER_URL   ?= redis://127.0.0.1:6379/15

.PHONY: run test install install-dev services lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(VENV)/.run-$(HASH): $(BIN)/python
	$(PIP) install -q -e .
	@rm -f $(VENV)/.run-* && touch $@

# The torch extra (a CPU build of torch==2.13.0) runs the PyTorch conversion tests.
$(VENV)/.dev-$(HASH): $(BIN)/python
	$(PIP) install -q -e '.[dev,torch]'
	@rm -f $(VENV)/.dev-* && touch $@

install: $(VENV)/.run-$(HASH)
install-dev: $(VENV)/.dev-$(HASH)

## run: install, migrate, create the admin, start web + workers + MLflow (Ctrl-C stops all)
run: install
	$(BIN)/python -m portal.stack

## test: services, lint, types, the whole test suite
test: install-dev services lint typecheck pytest

services:
	bash tests/ensure_services.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy deployer portal
	DJANGO_SETTINGS_MODULE=portal.settings_test $(BIN)/python manage.py makemigrations --check --dry-run

pytest:
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
