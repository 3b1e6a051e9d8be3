# tokenhub: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)
# Cargo's own output stays in target/; tests must not reach the network for vocabularies.
export HF_HUB_OFFLINE := 1
# The shared traffic traces the routing benchmark replays (never copied into the repo).
TRACES ?= $(or $(TOKENHUB_TRACES),../shared/traces)

.PHONY: help
help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

.PHONY: venv
venv: $(BIN)/.deps ## create .venv with the test, lint and reference packages

.PHONY: build
build: $(BIN)/.deps ## build the Rust extension (release) and install tokenhub into .venv
	$(BIN)/maturin develop --release --quiet

.PHONY: build-dev
build-dev: $(BIN)/.deps ## build the Rust extension in debug mode (faster to compile)
	$(BIN)/maturin develop --quiet

.PHONY: demo
demo: build ## build, then run the gateway demo (SQLite, built-in mock upstream, demo key)
	@$(BIN)/tokenhub count --vocab all examples/texts/* || true
	@echo
	$(BIN)/tokenhub serve --demo $(if $(PORT),--port $(PORT),)

# The console's browser tests (tests/browser) drive Debian's chromium through Playwright (from
# requirements-dev.txt; `playwright install` cannot download browsers here) and need a CJK font
# for the zh-CN pages. Installed as root when missing, the way scripts/test-postgres installs
# PostgreSQL: without them the browser tests skip, or fail when TOKENHUB_REQUIRE_BROWSER=1.
BROWSER_DEBS := chromium fonts-wqy-zenhei

.PHONY: browser-deps
browser-deps: ## install chromium and a CJK font (Debian, as root) for the browser tests if missing
	@missing=; for p in $(BROWSER_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "warning: missing$$missing; as root: apt-get install --no-install-recommends$$missing" \
	    "(the browser tests skip without them, or fail in CI)" >&2; exit 0; fi; \
	echo "installing$$missing from the Debian packages (apt-get install)" >&2; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt="apt-get -o DPkg::Lock::Timeout=300 -y -qq --no-install-recommends"; \
	$$apt install $$missing >/dev/null || \
	  { apt-get -o DPkg::Lock::Timeout=300 update -qq && $$apt install $$missing >/dev/null; } || \
	  echo "warning: apt-get install$$missing failed (the browser tests skip, or fail in CI)" >&2

.PHONY: test
test: build browser-deps ## build, then run the Rust and Python test suites (with a throwaway PostgreSQL and Redis)
	cargo test --release --quiet
	@# The PostgreSQL tests use TOKENHUB_TEST_PG_DSN when it is set, else a server started here
	@# (installed as root if missing) and stopped afterwards unless it was already running.
	@# Without one they skip, or fail when TOKENHUB_REQUIRE_PG=1 (as .ci/run sets) or CI is set.
	@# The same for Redis (scripts/test-redis, TOKENHUB_TEST_REDIS_URL, TOKENHUB_REQUIRE_REDIS).
	@if [ -z "$${TOKENHUB_TEST_PG_DSN:-}" ]; then \
	  scripts/test-postgres status || pg_started=1; \
	  if TOKENHUB_TEST_PG_DSN=$$(scripts/test-postgres start); then \
	    export TOKENHUB_TEST_PG_DSN; \
	  else \
	    echo "warning: no PostgreSQL (see above): its tests skip, or fail in CI" >&2; \
	  fi; \
	fi; \
	if [ -z "$${TOKENHUB_TEST_REDIS_URL:-}" ]; then \
	  scripts/test-redis status || redis_started=1; \
	  if TOKENHUB_TEST_REDIS_URL=$$(scripts/test-redis start); then \
	    export TOKENHUB_TEST_REDIS_URL; \
	  else \
	    echo "warning: no Redis (see above): its tests skip, or fail in CI" >&2; \
	  fi; \
	fi; \
	rc=0; $(BIN)/pytest -q || rc=$$?; \
	if [ -n "$${pg_started:-}" ]; then scripts/test-postgres stop; fi; \
	if [ -n "$${redis_started:-}" ]; then scripts/test-redis stop; fi; \
	exit $$rc

.PHONY: pg-start
pg-start: ## start the tests' throwaway PostgreSQL and print its DSN
	@scripts/test-postgres start

.PHONY: pg-stop
pg-stop: ## stop the tests' throwaway PostgreSQL
	scripts/test-postgres stop

.PHONY: redis-start
redis-start: ## start the tests' throwaway redis-server and print its URL
	@scripts/test-redis start

.PHONY: redis-stop
redis-stop: ## stop the tests' throwaway redis-server
	scripts/test-redis stop

.PHONY: bench
bench: build ## run the benchmarks (installs the optional baselines)
	-$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	@# Debian packages the benches use: Chinese prose for the meter bench (GPL data, read in
	@# place, never copied into the repo) and wrk as the gateway bench's load generator.
	@{ test -f /usr/share/games/fortunes/chinese && command -v wrk >/dev/null; } || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -y -qq fortunes-zh wrk >/dev/null; } || \
	  echo "note: apt-get install fortunes-zh wrk (the benches skip or fall back without them)"
	$(BIN)/python benches/bench_meter.py
	$(BIN)/python benches/bench_gateway.py
	@# Resident memory per concurrent long stream (200 streams x 20k tokens).
	$(BIN)/python benches/bench_stream_memory.py
	$(BIN)/python benches/bench_store.py
	@# Quota admission; starts (and installs, as root) a private redis-server for its baseline.
	$(BIN)/python benches/bench_quota.py
	@# What admission adds on running gateways (plain, with billing, with admission).
	$(BIN)/python benches/bench_admission.py
	@# Settlement on SQLite, and on the throwaway PostgreSQL the tests use.
	TOKENHUB_TEST_PG_DSN=$$(scripts/test-postgres start) $(BIN)/python benches/bench_settle.py
	$(BIN)/python benches/bench_settler_idle.py
	@# The web console's page times with 1M settled events, SQLite then PostgreSQL (the SQLite
	@# database is cached under $$TMPDIR for the day: building it takes a few minutes).
	TOKENHUB_TEST_PG_DSN=$$(scripts/test-postgres start) $(BIN)/python benches/bench_console_pages.py
	@# Routing decisions (ns in Rust, µs from Python), then the policies replayed on the shared
	@# traces and the tier router's quality track (../shared/traces, or TOKENHUB_TRACES).
	$(BIN)/python benches/bench_router.py
	$(BIN)/tokenhub bench-routing --trace $(TRACES)/AzureLLMInferenceTrace_conv_2023.csv \
	  --deployments examples/routing/steady.toml --policies swrr,p2c,latency,cheapest
	$(BIN)/tokenhub bench-routing --trace $(TRACES)/mooncake_conversation_trace.jsonl \
	  --deployments examples/routing/steady.toml --policies swrr,p2c,latency,cheapest --duration 3600
	$(BIN)/tokenhub bench-routing --quality --outcomes $(TRACES)/router_outcomes

.PHONY: lint
lint: $(BIN)/.deps ## ruff, mypy + stubtest, cargo fmt --check, cargo clippy
	$(BIN)/ruff check python tests benches
	$(BIN)/ruff format --check python tests benches
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest tokenhub._core
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings

.PHONY: format
format: $(BIN)/.deps ## apply ruff format and cargo fmt
	$(BIN)/ruff format python tests benches
	$(BIN)/ruff check --fix python tests benches
	cargo fmt

.PHONY: clean
clean: ## remove build products and the virtual environment
	rm -rf $(VENV) target .pytest_cache .mypy_cache .ruff_cache
