# The whole set-up on a fresh machine is `make demo` or `make test`: both create the project-local
# virtual environment and install the project through pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts

.PHONY: install demo test loadtest-ledger pg-stop bench serve loadtest loadtest-ci bench-http bench-allocation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

## the main job end to end: simulate -> train -> export -> budget policy (the policy table) -> serve, with a
## few real requests and one short campaign through the ledger -> score held-out users (the evaluation table)
demo: $(STAMP)
	$(BIN)/python -m scripts.demo --artifacts $(ARTIFACTS)

## the test suite (what CI runs)
test: $(STAMP)
	bash scripts/ensure_java.sh  # Spark's tests need Java 17+ (installed with apt-get if missing)
	# the ledger's tests run on PostgreSQL 15 too: a throwaway server on 127.0.0.1 (data in .pgdata/), whose URL
	# the script prints
	url=$$(bash scripts/ensure_postgres.sh) && EDGECOUPON_TEST_PG_URL=$$url $(BIN)/python -m pytest

## stop the test PostgreSQL server `make test` started (its data stays in .pgdata/)
pg-stop:
	bash scripts/ensure_postgres.sh stop

## torch eager vs onnxruntime fp32 vs int8, side by side (needs `make demo` first, or trains a small model)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_scorer --artifacts $(ARTIFACTS)

## the scoring service: gunicorn with the checked-in config (server/gunicorn_conf.py) on 127.0.0.1:8000,
## serving $(ARTIFACTS)/model with $(ARTIFACTS)/data/coupons.csv and the budget policy $(ARTIFACTS)/policy/policy.json
## (`make demo` writes all three). Other settings (the ledger, its admin token): EDGECOUPON_* variables or a
## TOML file named by EDGECOUPON_CONFIG (see server/config.py)
serve: $(STAMP)
	$(BIN)/python -m server --model-dir $(ARTIFACTS)/model --catalog $(ARTIFACTS)/data/coupons.csv \
		$(if $(wildcard $(ARTIFACTS)/policy/policy.json),--policy $(ARTIFACTS)/policy/policy.json)

## load test: the real server on 127.0.0.1 + locust headless at a fixed offered load, gated on
## loadtests/thresholds.toml; reports in reports/loadtest-<profile>/ (the demo model, else a cached tiny one)
loadtest: $(STAMP)
	$(BIN)/python -m loadtests --profile full --artifacts $(ARTIFACTS)

## the short load test CI runs after the unit tests (tens of seconds)
loadtest-ci: $(STAMP)
	$(BIN)/python -m loadtests --profile ci --artifacts $(ARTIFACTS)

## the issue -> redeem -> convert flow under load, on the SQLite ledger and on PostgreSQL (started on 127.0.0.1
## by scripts/ensure_postgres.sh), each gated on loadtests/thresholds.toml and checked against the ledger after
loadtest-ledger: $(STAMP)
	$(BIN)/python -m loadtests --profile ledger-sqlite --artifacts $(ARTIFACTS)
	url=$$(bash scripts/ensure_postgres.sh) && $(BIN)/python -m loadtests --profile ledger-postgresql \
		--artifacts $(ARTIFACTS) --ledger-url $$url

## /v1/score vs a no-op endpoint over HTTP, same gunicorn and load generator (a benchmark, ~2 minutes)
bench-http: $(STAMP)
	$(BIN)/python -m benchmarks.bench_http --artifacts $(ARTIFACTS)

## the budgeted-allocation solver on 1M users x 50 coupons, and the per-request decision (~35 s, 2.5 GB of RAM)
bench-allocation: $(STAMP)
	$(BIN)/python -m benchmarks.bench_allocation

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
