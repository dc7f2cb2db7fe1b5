# Drone delivery suite. `make help` lists the targets.

SHELL := bash

# The tests' servers: DATABASE_URL / AMQP_URL when set; else this machine's PostgreSQL and
# RabbitMQ when they answer on their standard ports; else none, and the tests start them in
# containers with testcontainers (a Docker engine is then needed; see README, "make test").
port_open = $(shell (exec 3<>/dev/tcp/127.0.0.1/$(1)) 2>/dev/null && echo yes)
ifeq ($(origin DATABASE_URL),undefined)
ifeq ($(call port_open,5432),yes)
DATABASE_URL := postgres://postgres@127.0.0.1:5432/postgres
export DATABASE_URL
endif
else
export DATABASE_URL
endif
ifeq ($(origin AMQP_URL),undefined)
ifeq ($(call port_open,5672),yes)
AMQP_URL := amqp://guest:guest@127.0.0.1:5672/%2f
export AMQP_URL
endif
else
export AMQP_URL
endif

NEXTEST := $(shell cargo nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: help run test openapi-fuzz lint fmt up clean-test-dbs sim chaos bench bench-messaging bench-ingest bench-e2e k8s-validate k8s-base image image-smoke test-containers

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

run: ## the whole suite in one process on embedded defaults (SQLite under ./data); Ctrl-C stops it
	cargo run -p standalone

# The tests spawn the services' binaries, so `make test` builds them first — together with the
# tests (`--bins --tests`): one feature set for both (the dev-dependencies' features, tokio's
# test-util among them), so the test build does not compile the dependencies a second time and
# openapi-fuzz runs the standalone binary just built (FUZZ_BUILD=0). `make chaos`,
# `make test-containers` and `make bench` build the same way and reuse it.
test: ## the whole test suite, against PostgreSQL (DATABASE_URL, else testcontainers), RabbitMQ (AMQP_URL, else testcontainers) and SQLite; then openapi-fuzz
	cargo build --workspace --bins --tests
ifeq ($(NEXTEST),yes)
	cargo nextest run --workspace --no-fail-fast
else
	cargo test --workspace --no-fail-fast
endif
	FUZZ_BUILD=0 bash scripts/openapi-fuzz.sh

openapi-fuzz: ## schemathesis (pinned, in a venv under target/) against every service's /openapi.json on the standalone suite: statuses, bodies, constraints as documented
	bash scripts/openapi-fuzz.sh

image: ## the suite's image drone-delivery:dev (Dockerfile), on local base images made from Debian's packages (IMAGE_BASES=upstream: the Dockerfile's defaults)
	bash scripts/image.sh

image-smoke: ## make image, then the eight services as containers (non-root, read-only root, no capabilities) on this machine's PostgreSQL and RabbitMQ; one booking until scheduled; removes all it started
	bash scripts/image-smoke.sh

test-containers: ## the integration tests on PostgreSQL and RabbitMQ started by testcontainers (DATABASE_URL and AMQP_URL unset; local stand-in images)
	bash scripts/test-containers.sh

chaos: ## chaos runs under booking load (scheduler kill/pause, supervisor kill, domain restarts, RabbitMQ restart on a private node, downstream faults, a 30 s Package outage behind the circuit breaker), invariants after each
	bash scripts/chaos.sh

lint: ## rustfmt check and clippy with warnings as errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	cargo fmt --all

k8s-validate: ## render k8s/ overlays and the Helm chart, validate every object offline (Kubernetes 1.30, strict), helm lint, self-test
	bash scripts/k8s-validate.sh

k8s-base: ## regenerate k8s/base from helm/drone-delivery (after changing the chart)
	bash scripts/k8s-validate.sh --update-base

bench: ## bench-messaging, bench-ingest, bench-e2e and the scheduler-kill recovery; summary table into docs/BENCHMARKS.md (BENCH_QUICK=1: shortened check)
	bash scripts/bench.sh

bench-messaging: ## measure the messaging backends (RabbitMQ at AMQP_URL, embedded under target/bench); see docs/BENCHMARKS.md
	cargo run --release -p integration-tests --bin bench-messaging -- \
	  --backend both --url "$(AMQP_URL)" --embedded-file target/bench/messaging.db

bench-ingest: ## load-test Ingestion open-loop (5k, 10k, 20k req/s, a 50k spike) on RabbitMQ at AMQP_URL; see docs/BENCHMARKS.md
	bash scripts/bench-ingest.sh

bench-e2e: ## sagas end to end: every service as a release process on fresh PostgreSQL databases, 0.2k/1k/2k/3k bookings/s for 20 s each; see docs/BENCHMARKS.md
	bash scripts/bench-e2e.sh

up: ## start (installing if needed) PostgreSQL and RabbitMQ on this machine
	bash scripts/services-up.sh

clean-test-dbs: ## drop test databases left behind by interrupted test runs
	psql "$(DATABASE_URL)" -Atc "select datname from pg_database where datname like 'test\_%'" \
	  | while read -r db; do psql "$(DATABASE_URL)" -qc "drop database if exists \"$$db\" with (force)"; done

sim: ## the Scheduler's deterministic simulation: SIM_SEEDS=<n> seeds (default 2000), SIM_SEED=<n> replays one; prints seeds per second
	SIM_SEEDS=$${SIM_SEEDS:-2000} cargo test --release -p scheduler --test sim -- --nocapture --test-threads 1
