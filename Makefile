# One command each: `make run` serves/runs the example, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Node tools (buf; the Node client's gRPC libraries) from package-lock.json.
NPM_STAMP := node_modules/.installed
BUF    := node_modules/.bin/buf
# Our packages, compiled to bytecode before serving (see `run`).
PACKAGES := nexus_server dataflow workflow nexus_api clients

.PHONY: run test lint protocheck protos typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NPM_STAMP): package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $(NPM_STAMP)

## run: create the environment and serve the example app (Ctrl-C stops it)
# The editable install leaves our packages uncompiled, and where PYTHONDONTWRITEBYTECODE
# is set (common in containers) Python would compile them again at every start: about
# 100 ms of `nexus serve`'s start-up (docs/server.md, "Start-up"). compileall only
# rewrites what changed.
run: $(STAMP)
	$(PY) -m compileall -q $(PACKAGES)
	$(VENV)/bin/nexus serve examples/contacts_app.py

## test: create the environment, lint, type-check and run the whole test suite
test: lint protocheck typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## protocheck: buf lint, and buf breaking against the last landed main (proto/)
protocheck: $(STAMP) $(NPM_STAMP)
	@$(PY) scripts/gen_protos.py --deps-only >/dev/null
	$(BUF) lint
	$(PY) scripts/proto_breaking.py

## protos: regenerate the stubs in nexus_api/ (and .proto-deps/) from proto/
protos: $(STAMP)
	$(PY) scripts/gen_protos.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest

## bench: run every benchmark (prints figures and ratios to in-run baselines)
bench: $(STAMP)
	$(PY) bench/runtime.py
	$(PY) bench/dataflow.py
	$(PY) bench/grpc.py
	$(PY) bench/rest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
