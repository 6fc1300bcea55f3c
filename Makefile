# The two commands in README: `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := operator/relora_operator operator/relora_sandbox trainer_image/relora_trainer

.PHONY: demo test lint typecheck unit crd clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[operator,trainer,sandbox,testbed,dev]'
	touch $(STAMP)

## demo: install, check the examples, build the toy world and migrate its adapter
demo: $(STAMP)
	$(BIN)/relora validate -f examples/local-migration.yaml -f examples/cluster-migration.yaml
	$(BIN)/relora testbed toy --out examples/toy
	$(BIN)/relora run -f examples/local-migration.yaml

## test: lint, format check, type check and the test suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(PACKAGES) tests

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
unit: $(STAMP)
	$(BIN)/python -m pytest; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$code

## crd: regenerate crds/ from the API models
crd: $(STAMP)
	$(BIN)/relora crd > crds/adaptermigrations.relora.dev.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
