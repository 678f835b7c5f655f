SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: run test lint proto proto-check proto-breaking bench setup system-deps clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "python 3.11 is required"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# xds-protos ships an older copy of OpenTelemetry's protos over opentelemetry-proto's files, which breaks
	@# the OTLP exporter's import; the pinned opentelemetry-proto goes back on top.
	$(BIN)/pip install -q --force-reinstall --no-deps "$$(grep -o 'opentelemetry-proto==[0-9.]*' pyproject.toml)"
	touch $(STAMP)

setup: $(STAMP)

## System packages the tests need (SoftHSM2 for the key vault's HSM path).
system-deps:
	@if [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q softhsm2 >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q softhsm2 >/dev/null); \
	  else sudo apt-get install -y -q softhsm2 >/dev/null; fi; fi

run: $(STAMP)
	$(BIN)/tradeguard up

test: $(STAMP) system-deps
	$(BIN)/pytest

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  $(PROTO_FILES)
	@# the edge's transcoder descriptor: the trading API, and google.rpc.Status with its error details (from
	@# googleapis-common-protos) so that a gRPC error reaches a JSON client as a JSON body
	$(BIN)/python -m grpc_tools.protoc -I protos -I "$$($(BIN)/python -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')" \
	  --include_imports --descriptor_set_out=deploy/envoy/tradeguard.pb \
	  protos/tradeguard/trading/v1/trading.proto google/rpc/status.proto google/rpc/error_details.proto

## Fails when the committed generated code differs from a fresh `make proto`.
proto-check: proto
	@git add -N . >/dev/null 2>&1; \
	if ! git diff --quiet -- tradeguard deploy; then echo "generated code is stale: run make proto and commit"; git diff --stat -- tradeguard deploy; exit 1; fi

## v1 APIs never break: the protos are checked (buf breaking, FILE rules) against every committed version.
proto-breaking: $(STAMP)
	@depth=$$(git rev-list --count HEAD); for rev in $$(git log --format=%H -- protos); do \
	  $(BIN)/buf breaking --against ".git#ref=$$rev,depth=$$depth,subdir=protos" \
	    || { echo "breaking change against $$rev"; exit 1; }; \
	done; echo "protos compatible with every committed version"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/buf lint

bench: $(STAMP)
	$(BIN)/python -m bench.trading_mtls
	$(BIN)/python -m bench.trading_store
	$(BIN)/python -m bench.keyvault_crypto
	$(BIN)/python -m bench.kit_chain
	$(BIN)/python -m bench.guard
	$(BIN)/python -m bench.ratelimit
	$(BIN)/python -m bench.audit
	$(BIN)/python -m bench.full_chain
	$(BIN)/python -m bench.audit_core
	$(BIN)/python -m bench.risk
	$(BIN)/python -m bench.risk_trading
	$(BIN)/python -m bench.monitor

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
