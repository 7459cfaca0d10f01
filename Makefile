# Every target sets up its own environment: only Python 3.11+ is needed on the machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BOOT := .cache/uv-venv
UV := $(BOOT)/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup demo test test-unit lint typecheck chaos bench flower up down clean

# uv (pinned, from PyPI) installs exactly what uv.lock says.
$(UV):
	$(PYTHON) -m venv $(BOOT)
	$(BOOT)/bin/pip install -q --disable-pip-version-check "uv==0.13.8"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON) --quiet
	touch $@

setup: $(VENV)/.synced

demo: setup  ## run the system on one machine and show every outcome (KEEP=1: leave it running)
	$(VENV)/bin/cancelflow demo $(if $(KEEP),--keep)

test: setup  ## unit and integration tests, the integration suite over Redis and over RabbitMQ
	scripts/with-redis $(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest -m "not integration" $(PYTEST_ARGS)

# make chaos BROKER=amqp: on RabbitMQ (see tests/rabbitmq.py for which server).
BROKER ?= redis

chaos: setup  ## the fault-injection suite at 5,000 jobs (CHAOS_JOBS to change; BROKER=redis|amqp)
	CANCELFLOW_CHAOS_JOBS=$${CHAOS_JOBS:-5000} CANCELFLOW_CHAOS_REPORT=$${CHAOS_REPORT:-chaos-report.json} \
		CANCELFLOW_TEST_BROKERS=$(BROKER) \
		scripts/with-redis $(VENV)/bin/pytest -s tests/integration/test_chaos.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# make bench: a leg on each broker (Redis, then RabbitMQ: see tests/rabbitmq.py for which
# server); make bench BROKER=redis or BROKER=amqp: that broker's leg alone.
comma := ,
BENCH_BROKERS ?= $(if $(filter command line environment,$(origin BROKER)),$(BROKER),redis$(comma)amqp)

bench: setup  ## Cancelflow against plain Celery chains, on each broker: jobs/s, latency, memory, targets
	$(UV) sync --frozen --group bench --quiet
	BENCH_BROKERS=$(BENCH_BROKERS) scripts/with-redis $(VENV)/bin/python -m bench

# Refuses to start without FLOWER_BASIC_AUTH=user:password (Flower's API can send any task and
# shut workers down); `make flower FLOWER_ARGS=--no-auth` runs it open, on 127.0.0.1 only.
flower: setup  ## Flower against the same broker (CANCELFLOW_REDIS_URL), behind basic auth
	$(VENV)/bin/cancelflow flower --address=127.0.0.1 --port=$${FLOWER_PORT:-5555} $(FLOWER_ARGS)

up:  ## the whole system in containers, providers played by the sandboxes (docker-compose.yml)
	docker compose up -d --build

down:  ## stop it (Redis keeps its data in the redis-data volume)
	docker compose down

clean:
	rm -rf $(VENV) $(BOOT) .pytest_cache .mypy_cache .ruff_cache
