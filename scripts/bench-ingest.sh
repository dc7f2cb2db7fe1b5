#!/usr/bin/env bash
# `make bench-ingest`: builds the Ingestion service and the load generator in release mode, starts
# Ingestion against RabbitMQ (AMQP_URL) with a fresh log prefix and a SQLite read model under
# target/bench/, then offers bookings open-loop at each rate of BENCH_INGEST_RUNS and checks after
# each run that every 202 is in the log exactly once. Ingestion is always stopped and the
# benchmark's streams deleted on exit (BENCH_INGEST_KEEP_LOG=1 keeps them for a look).
#
#   BENCH_INGEST_RUNS   "rate:seconds[:label] ..." (default: 5k, 10k, 20k for 20 s, a 10 s 50k spike)
#   BENCH_INGEST_PORT   Ingestion's port (default 8080)
#   LOADGEN_ARGS        extra loadgen arguments, e.g. "--accounts 5000 --timeout-ms 1000"
#   APP_*, RUST_LOG     passed on to Ingestion, e.g. APP_MESSAGING__BATCH_LINGER_US=3000 (the ones
#                       set below win); APP_HTTP__TRACE_SAMPLE_RATIO defaults to 0.01 as in the
#                       Kubernetes manifests
#   BENCH_INGEST_BIN    the binaries' folder (default target/release, built first); another folder
#                       is used as it is, e.g. an earlier commit's build for a paired comparison
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf '[bench-ingest] %s\n' "$*"; }

AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
RUNS=${BENCH_INGEST_RUNS:-"5000:20 10000:20 20000:20 50000:10:spike-50000/s"}
PORT=${BENCH_INGEST_PORT:-8080}
TARGET=${CARGO_TARGET_DIR:-target}
BENCH_DIR=target/bench
PARTITIONS=8
PREFIX="bench-ingest-$(date +%s)-$RANDOM"
SECRET="bench-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SERVICE_TOKEN="svc-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
URL="http://127.0.0.1:$PORT"
BIN=${BENCH_INGEST_BIN:-$TARGET/release}
LOADGEN="$BIN/loadgen"

if [ "$BIN" = "$TARGET/release" ]; then
  log "building ingestion and loadgen (release)"
  cargo build --release -p ingestion --bin ingestion
  cargo build --release -p integration-tests --bin loadgen
fi

if curl -s -o /dev/null "$URL/healthz"; then
  log "something already listens on port $PORT; stop it or set BENCH_INGEST_PORT"
  exit 1
fi

mkdir -p "$BENCH_DIR"
rm -f "$BENCH_DIR"/ingestion.db "$BENCH_DIR"/ingestion.db-*
SERVICE_LOG="$BENCH_DIR/ingestion.log"

INGESTION_PID=""
cleanup() {
  local status=$?
  if [ -n "$INGESTION_PID" ] && kill -0 "$INGESTION_PID" 2>/dev/null; then
    log "stopping ingestion (pid $INGESTION_PID)"
    kill -TERM "$INGESTION_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$INGESTION_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$INGESTION_PID" 2>/dev/null || true
    wait "$INGESTION_PID" 2>/dev/null || true
  fi
  if [ -z "$INGESTION_PID" ]; then
    :
  elif [ "${BENCH_INGEST_KEEP_LOG:-0}" != 1 ]; then
    "$LOADGEN" --cleanup --prefix "$PREFIX" --amqp-url "$AMQP_URL" --partitions "$PARTITIONS" \
      || log "could not delete the streams of prefix $PREFIX"
  else
    log "kept the streams of prefix $PREFIX"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting ingestion on port $PORT, log prefix $PREFIX (service log: $SERVICE_LOG)"
env APP_HTTP__PORT="$PORT" \
  APP_HTTP__WORKERS=0 \
  APP_AUTH__JWT_SECRET="$SECRET" \
  APP_AUTH__SERVICE_TOKEN="$SERVICE_TOKEN" \
  APP_DATABASE__URL="sqlite://$BENCH_DIR/ingestion.db?mode=rwc" \
  APP_MESSAGING__URL="$AMQP_URL" \
  APP_MESSAGING__PREFIX="$PREFIX" \
  APP_INGESTION__PARTITIONS="$PARTITIONS" \
  APP_INGESTION__RATE_PER_SECOND=1000000 \
  APP_INGESTION__RATE_BURST=1000000 \
  APP_INGESTION__MAX_IN_FLIGHT=20000 \
  APP_HTTP__TRACE_SAMPLE_RATIO="${APP_HTTP__TRACE_SAMPLE_RATIO:-0.01}" \
  RUST_LOG="${RUST_LOG:-info}" \
  "$BIN/ingestion" >"$SERVICE_LOG" 2>&1 &
INGESTION_PID=$!

for _ in $(seq 1 120); do
  if ! kill -0 "$INGESTION_PID" 2>/dev/null; then
    log "ingestion exited during start; the end of its log:"
    tail -n 20 "$SERVICE_LOG"
    exit 1
  fi
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ] && break
  sleep 0.5
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ] \
  || { log "ingestion not ready after 60 s"; tail -n 20 "$SERVICE_LOG"; exit 1; }
log "ingestion is ready"

log "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), \
$(free -g | awk '/^Mem:/ {print $2}') GB RAM, $(uname -sr); RabbitMQ on $AMQP_URL"

# CPU time of the service and the broker per run, to see what limits throughput.
cpu_of=(--cpu-of "ingestion=$INGESTION_PID")
BEAM_PID=$(pgrep -x beam.smp | head -n 1 || true)
[ -z "$BEAM_PID" ] || cpu_of+=(--cpu-of "rabbitmq=$BEAM_PID")

results=()
failed=0
for run in $RUNS; do
  IFS=: read -r rate seconds label <<<"$run"
  label=${label:-$rate/s}
  echo
  log "=== $label: $rate bookings/s for $seconds s ==="
  out="$BENCH_DIR/loadgen-$rate.out"
  # shellcheck disable=SC2086 # LOADGEN_ARGS is a list of arguments
  if APP_AUTH__JWT_SECRET="$SECRET" "$LOADGEN" --url "$URL" --rate "$rate" --duration "$seconds" \
    --label "$label" --verify --prefix "$PREFIX" --amqp-url "$AMQP_URL" \
    --partitions "$PARTITIONS" "${cpu_of[@]}" ${LOADGEN_ARGS:-} | tee "$out"; then
    :
  else
    failed=1
  fi
  line=$(grep '^RESULT ' "$out" | sed 's/^RESULT //' || true)
  results+=("${line:-| $label | run failed, see above |}")
  sleep 2
done

echo
log "results (latency of the 202s in ms from each request's due time, open loop; 'service answered/s'
counts every answer, also those that came after the client's timeout):"
echo
echo "| run | offered/s | sent | 202s in time | accepted/s | service answered/s | p50 | p90 | p99 | p99.9 | max | errors | log check | 503 p99 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"
printf '%s\n' "${results[@]}"
echo
if [ "$failed" != 0 ]; then
  log "at least one run failed its verification (see above)"
  exit 1
fi
