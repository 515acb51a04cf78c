# Set-up is automatic: every target that needs the virtualenv creates it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck check bench fake clean clients

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (set PYTHON=python3.12 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[site,test]'
	@touch $(STAMP)

install: $(STAMP)

# The server on http://localhost:3000 (the fake OpenRouter when OPENROUTER_API_KEY is unset).
run: $(STAMP)
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(BIN)/python manage.py serve --port $${PORT:-3000}

# The whole suite, with lint and type checks.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/python manage.py check --fail-level ERROR
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

# One layer of the suite alone (tests/unit, tests/app, tests/system), without the other checks.
.PHONY: test-unit test-app test-system
test-unit: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider tests/unit $(PYTEST_ARGS)

test-app: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider tests/app $(PYTEST_ARGS)

test-system: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider tests/system $(PYTEST_ARGS)

# The npm clients the end-to-end tests run (opencode, Claude Code, Codex), pinned, into var/.
# The tests install them on first use too; this does it up front (CI).
clients: $(STAMP)
	$(BIN)/python -m tests.support.npm_clients

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy .

# Django's system checks (every setting of the two apps) and missing migrations.
check: $(STAMP)
	$(BIN)/python manage.py check --fail-level ERROR
	$(BIN)/python manage.py makemigrations --check --dry-run

# The benchmark tables (see README's Performance): us, nginx, LiteLLM and Portkey against the
# same fake upstream, about 15 minutes. BENCH_ARGS="--short" for the quick run CI does (nothing
# installed, nothing asserted); BENCH_ARGS="--profile" adds py-spy profiles of one worker of ours.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

fake: $(STAMP)
	$(BIN)/python manage.py fake_openrouter --port $${FAKE_PORT:-3999}

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .hypothesis

# A million usage records in a scratch database, to look at the admin at scale:
#   DATABASE_URL=postgres://.../scratch make seed-usage
.PHONY: seed-usage
seed-usage: $(STAMP)
	$(BIN)/python manage.py migrate --no-input
	$(BIN)/python manage.py seed_usage --records $${RECORDS:-1000000} --users $${USERS:-200}
	$(BIN)/python manage.py check_ledger

# The long soak on loopback: 20,000 requests through two workers, then the books, plus the
# 45-second database outage (on PostgreSQL). SOAK_REQUESTS to change the count; figures are
# printed and appended to var/reliability-figures.jsonl.
.PHONY: soak
soak: $(STAMP)
	mkdir -p var
	SOAK_REQUESTS=$${SOAK_REQUESTS:-20000} RELIABILITY_LONG=1 \
		RELIABILITY_FIGURES=$${RELIABILITY_FIGURES:-var/reliability-figures.jsonl} \
		$(BIN)/pytest -p no:cacheprovider -s -rxX tests/system/test_soak.py \
		tests/system/test_faults.py::test_database_recovers_promptly_after_a_long_outage
