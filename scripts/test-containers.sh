#!/usr/bin/env bash
# `make test-containers`: the integration tests that touch PostgreSQL and RabbitMQ, with neither
# DATABASE_URL nor AMQP_URL set, so that they start both with testcontainers — the path of a
# developer who has only Docker. No image registry is reachable here, so the images are local
# stand-ins for the upstream ones, made from Debian's packages with the environment and the
# readiness output the testcontainers-modules images have (scripts/docker-base.sh test) and
# named by TEST_POSTGRES_IMAGE / TEST_RABBITMQ_IMAGE. Afterwards it checks that no container of
# the run is left behind.
#
#   TEST_CONTAINERS_UPSTREAM=1   use the modules' own images (a machine that reaches Docker Hub)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/docker-env.sh
source scripts/docker-env.sh
log() { printf '[test-containers] %s\n' "$*"; }

docker_up
if [ "${TEST_CONTAINERS_UPSTREAM:-0}" != 1 ]; then
  bash scripts/docker-base.sh test
  export TEST_POSTGRES_IMAGE=${TEST_POSTGRES_IMAGE:-$STANDIN_POSTGRES_IMAGE}
  export TEST_RABBITMQ_IMAGE=${TEST_RABBITMQ_IMAGE:-$STANDIN_RABBITMQ_IMAGE}
fi
unset DATABASE_URL AMQP_URL RABBITMQCTL
label=drone-delivery.tests.owner
before=$("$DOCKER" ps -aq --filter "label=$label" | wc -l)

# The tests whose servers come from test_support: the saga store and engine (PostgreSQL), the
# pool's reconnects, the messaging conformance suite (RabbitMQ, cutting connections with
# `docker exec … rabbitmqctl`), and the services' integration tests on both. Built and chosen over
# the whole workspace (a filterset, not `-p`) so that the features are those `make test` built
# with: a package subset would unify other features and compile the dependencies again.
binaries=(saga::store saga::engine service-kit::db_pool messaging::conformance
  integration-tests::account integration-tests::package integration-tests::thirdparty
  integration-tests::drone integration-tests::delivery integration-tests::ingestion
  integration-tests::e2e integration-tests::supervisor_parked)
filter=$(printf 'binary_id(%s) or ' "${binaries[@]}")
filter=${filter% or }
log "cargo nextest run -E '$filter' (PostgreSQL: ${TEST_POSTGRES_IMAGE:-postgres:15-alpine}, \
RabbitMQ: ${TEST_RABBITMQ_IMAGE:-rabbitmq:3.13-management})"
cargo build --workspace --bins --tests
since=$(date +%s)
status=0
cargo nextest run --workspace --no-fail-fast -E "$filter" || status=$?

# The reaper removes the run's containers once nextest has exited; give it a moment.
left=""
for _ in $(seq 1 30); do
  left=$("$DOCKER" ps -aq --filter "label=$label" | wc -l)
  [ "$left" -le "$before" ] && break
  sleep 1
done
if [ "$left" -gt "$before" ]; then
  log "containers of this run were left behind:"
  "$DOCKER" ps -a --filter "label=$label"
  exit 1
fi
started=$("$DOCKER" events --since "$since" --until "$(date +%s)" --filter "label=$label" \
  --filter event=start --format '{{.From}}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')
log "containers started by the tests: ${started%, }"
[ -n "$started" ] || { log "no test started a container: were DATABASE_URL/AMQP_URL set?"; exit 1; }
log "no container left behind ($left with label $label before and after: $before)"
exit "$status"
