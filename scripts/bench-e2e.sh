#!/usr/bin/env bash
# `make bench-e2e`: end-to-end sagas. Builds every service and the bench-e2e driver in release
# mode, creates a fresh PostgreSQL database per service (bench_<service>_<random>) on the server of
# DATABASE_URL, starts account, package, thirdparty, drone, delivery, ingestion and scheduler as their own
# processes (configured by APP_* variables, as in Kubernetes) against RabbitMQ at AMQP_URL with a
# fresh queue prefix, then lets integration-tests/src/bin/bench_e2e.rs offer bookings to Ingestion
# at one rate of BENCH_E2E_RUNS and measure scheduled/s, booking-to-scheduled latency, commits per
# saga and CPU per process. Every run gets such a fresh stack. The services are always stopped,
# the databases dropped and the streams deleted, also on failure or Ctrl-C (BENCH_E2E_KEEP=1 keeps
# the databases and streams for a look).
#
#   BENCH_E2E_RUNS      "rate:seconds ..." (default "200:20 1000:20 2000:20 3000:20")
#   BENCH_E2E_PORT      first of seven consecutive ports (default 18080: ingestion, then account,
#                       package, thirdparty, drone, delivery, scheduler)
#   BENCH_E2E_POOL      database pool size of each domain service and ingestion (default 8; the
#                       scheduler keeps 16), so six services stay under max_connections = 100
#   BENCH_E2E_LOG       RUST_LOG of the services (default info, as in production)
#   BENCH_E2E_ARGS      extra bench-e2e arguments, e.g. "--accounts 5000 --drain-timeout 600"
#   BENCH_E2E_BUILD     0 runs the binaries already in $CARGO_TARGET_DIR/release without building
#                       (to pair builds of other code, e.g. another allocator; default 1)
#   BENCH_E2E_TRACE_SAMPLE_RATIO
#                       share of new traces Ingestion's door samples (default 0.01, as deployed:
#                       k8s/base/ingestion.yaml and the chart; 1 traces every booking)
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf '[bench-e2e] %s\n' "$*"; }

DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
RUNS=${BENCH_E2E_RUNS:-"200:20 1000:20 2000:20 3000:20"}
BASE_PORT=${BENCH_E2E_PORT:-18080}
POOL=${BENCH_E2E_POOL:-8}
SERVICE_LOG_LEVEL=${BENCH_E2E_LOG:-info}
TARGET=${CARGO_TARGET_DIR:-target}
DIR=target/bench/e2e
PARTITIONS=8
SUFFIX=""
PREFIX=""
SECRET="bench-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SERVICE_TOKEN="svc-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SERVICES=(account package thirdparty drone delivery ingestion scheduler)
declare -A PORT=(
  [ingestion]=$BASE_PORT [account]=$((BASE_PORT + 1)) [package]=$((BASE_PORT + 2))
  [drone]=$((BASE_PORT + 3)) [delivery]=$((BASE_PORT + 4)) [scheduler]=$((BASE_PORT + 5))
  [thirdparty]=$((BASE_PORT + 6))
)
declare -A DB PID

# shellcheck source=scripts/db-url.sh
source scripts/db-url.sh
url() { printf 'http://127.0.0.1:%s' "${PORT[$1]}"; }

if [ "${BENCH_E2E_BUILD:-1}" = 0 ]; then
  log "running the binaries in $TARGET/release as they are (BENCH_E2E_BUILD=0)"
else
  log "building the services and bench-e2e (release)"
  cargo build --release -p account -p package -p thirdparty -p drone -p delivery -p ingestion -p scheduler
  cargo build --release -p integration-tests --bin bench-e2e
fi
BENCH="$TARGET/release/bench-e2e"

for svc in "${SERVICES[@]}"; do
  if curl -s -o /dev/null "$(url "$svc")/healthz"; then
    log "port ${PORT[$svc]} ($svc) is taken; stop what listens there or set BENCH_E2E_PORT"
    exit 1
  fi
done
mkdir -p "$DIR"

# Stops the services of the current stack and, unless BENCH_E2E_KEEP=1, drops its databases and
# deletes its streams.
stack_down() {
  for svc in "${SERVICES[@]}"; do
    local pid=${PID[$svc]:-}
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for svc in "${SERVICES[@]}"; do
    local pid=${PID[$svc]:-}
    [ -n "$pid" ] || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PID=()
  [ ${#DB[@]} -gt 0 ] || return 0
  if [ "${BENCH_E2E_KEEP:-0}" = 1 ]; then
    log "kept databases ${DB[*]} and the streams of prefix $PREFIX"
  else
    "$BENCH" --cleanup --prefix "$PREFIX" --amqp-url "$AMQP_URL" --partitions "$PARTITIONS" \
      >/dev/null 2>&1 || log "could not delete the streams of prefix $PREFIX"
    for db in "${DB[@]}"; do
      psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
        || log "could not drop database $db"
    done
    log "stack $SUFFIX stopped; databases dropped, streams deleted (service logs in $DIR/)"
  fi
  DB=()
}
cleanup() {
  local status=$?
  stack_down
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start SERVICE VAR=VALUE... : the release binary, configured by the environment only.
start() {
  local svc=$1
  shift
  local pool=$POOL
  [ "$svc" = scheduler ] && pool=16
  env APP_HTTP__HOST=127.0.0.1 \
    APP_HTTP__PORT="${PORT[$svc]}" \
    APP_DATABASE__URL="$(db_url "${DB[$svc]}")" \
    APP_DATABASE__MAX_CONNECTIONS="$pool" \
    APP_AUTH__SERVICE_TOKEN="$SERVICE_TOKEN" \
    APP_AUTH__JWT_SECRET="$SECRET" \
    RUST_LOG="$SERVICE_LOG_LEVEL" \
    "$@" "$TARGET/release/$svc" >"$DIR/$svc.log" 2>&1 &
  PID[$svc]=$!
}

# A fresh stack: new databases, a new queue prefix, all six services started and ready.
stack_up() {
  SUFFIX=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
  PREFIX="bench-e2e-$SUFFIX"
  for svc in "${SERVICES[@]}"; do
    DB[$svc]="bench_${svc}_$SUFFIX"
    psql "$DATABASE_URL" -qc "CREATE DATABASE \"${DB[$svc]}\"" >/dev/null
  done
  local messaging=(APP_MESSAGING__URL="$AMQP_URL" APP_MESSAGING__PREFIX="$PREFIX")
  start account "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-account"
  start package
  start thirdparty
  # 100 drones; bench-e2e spreads pickups over a year, so no window is ever short of one.
  start drone APP_FLEET__SMALL=40 APP_FLEET__MEDIUM=30 APP_FLEET__LARGE=30
  start delivery "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-delivery" \
    APP_TRACKING__PARTITIONS="$PARTITIONS"
  start ingestion "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-ingestion" \
    APP_HTTP__TRACE_SAMPLE_RATIO="${BENCH_E2E_TRACE_SAMPLE_RATIO:-0.01}" \
    APP_INGESTION__PARTITIONS="$PARTITIONS" \
    APP_INGESTION__RATE_PER_SECOND=1000000 APP_INGESTION__RATE_BURST=1000000
  start scheduler "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-scheduler" \
    APP_DOWNSTREAM__ACCOUNT_URL="$(url account)" APP_DOWNSTREAM__PACKAGE_URL="$(url package)" \
    APP_DOWNSTREAM__DRONE_URL="$(url drone)" APP_DOWNSTREAM__DELIVERY_URL="$(url delivery)" \
    APP_DOWNSTREAM__THIRDPARTY_URL="$(url thirdparty)" \
    APP_SCHEDULER__PARTITIONS="$PARTITIONS" APP_SCHEDULER__REPLICAS=1 \
    APP_SCHEDULER__ORDINAL=0 APP_SCHEDULER__INSTANCE_ID=bench-scheduler-0
  for svc in "${SERVICES[@]}"; do
    local ready=""
    for _ in $(seq 1 120); do
      if ! kill -0 "${PID[$svc]}" 2>/dev/null; then
        log "$svc exited during start; the end of its log:"
        tail -n 20 "$DIR/$svc.log"
        return 1
      fi
      if [ "$(curl -s -o /dev/null -w '%{http_code}' "$(url "$svc")/readyz")" = 200 ]; then
        ready=yes
        break
      fi
      sleep 0.5
    done
    [ -n "$ready" ] || { log "$svc not ready after 60 s"; tail -n 20 "$DIR/$svc.log"; return 1; }
  done
  log "stack $SUFFIX ready: databases bench_<service>_$SUFFIX, prefix $PREFIX, \
ports $BASE_PORT-$((BASE_PORT + 5))"
}

log "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), \
$(free -g | awk '/^Mem:/ {print $2}') GB RAM, $(uname -sr)"
log "$(psql "$DATABASE_URL" -Atc 'select version()' | cut -d' ' -f1-2), \
synchronous_commit=$(psql "$DATABASE_URL" -Atc 'show synchronous_commit'); RabbitMQ at $AMQP_URL; \
services log at RUST_LOG=$SERVICE_LOG_LEVEL"

# Each run gets a fresh stack, so no run inherits another's backlog or tables.
table=()
status=0
for run in $RUNS; do
  echo
  log "=== run $run (rate:seconds) on a fresh stack; load average $(cut -d' ' -f1-3 /proc/loadavg) ==="
  stack_up
  pids=""
  databases=""
  for svc in "${SERVICES[@]}"; do
    pids+="$svc=${PID[$svc]},"
    databases+="$svc=${DB[$svc]},"
  done
  out="$DIR/bench-${run%%:*}.out"
  # shellcheck disable=SC2086 # BENCH_E2E_ARGS is a list of arguments
  if APP_AUTH__JWT_SECRET="$SECRET" APP_AUTH__SERVICE_TOKEN="$SERVICE_TOKEN" "$BENCH" \
    --runs "$run" \
    --ingestion-url "$(url ingestion)" --account-url "$(url account)" \
    --scheduler-url "$(url scheduler)" \
    --scheduler-db "$(db_url "${DB[scheduler]}")" --stats-db "$DATABASE_URL" \
    --databases "${databases%,}" --pids "${pids%,}" ${BENCH_E2E_ARGS:-} | tee "$out"; then
    :
  else
    status=1
  fi
  log "service log sizes: $(for svc in "${SERVICES[@]}"; do
    printf '%s %s ' "$svc" "$(du -h "$DIR/$svc.log" | cut -f1)"; done)"
  stack_down
  rows=$(awk '/^RESULTS$/ {f = 1; next} f && /^\|/' "$out")
  if [ ${#table[@]} -eq 0 ]; then
    mapfile -t table <<<"$rows"
  else
    mapfile -t more <<<"$(tail -n +3 <<<"$rows")"
    table+=("${more[@]}")
  fi
done

echo
log "results (latency = the saga's completion in the Scheduler's journal − the client's 202):"
echo
printf '%s\n' "${table[@]}"
echo
[ "$status" = 0 ] || log "at least one run lost bookings or failed sagas (see above)"
exit "$status"
