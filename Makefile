# The two set-up commands of the README: `make serve` and `make test`. Both create .venv first.
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: serve test build lint clean

$(INSTALLED): pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh

## serve: build the reference models if missing, then run tritonserver in the foreground (ARGS=... passes flags)
serve: $(INSTALLED)
	$(VENV)/bin/tierserve serve $(ARGS)

## test: lint (what `make lint` checks), then the whole suite against a real tritonserver (PYTEST_ARGS=... passes flags)
test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

## build: (re)build the reference models into model_repository/
build: $(INSTALLED)
	$(VENV)/bin/tierserve build $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .tierserve .pytest_cache .ruff_cache
