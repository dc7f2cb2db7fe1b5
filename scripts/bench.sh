#!/usr/bin/env bash
# `make bench`: the messaging, ingestion and end-to-end benchmarks one after the other, then the
# Scheduler-kill recovery (the chaos test `scheduler_kill_under_load`: every service as its own
# process, kill -9 under load, invariants after), and a summary table of all of them with the
# date, the machine and the goals of DESIGN §9 written into docs/BENCHMARKS.md (between the
# `bench-summary` markers). Each benchmark's full output is kept in target/bench/summary/.
#
#   BENCH_QUICK=1   shortened settings (a few seconds per run) to check that everything works;
#                   the summary says so. Otherwise each benchmark runs its own defaults.
#   BENCH_SKIP      benchmarks to leave out, e.g. "messaging ingest" (their rows say "not run")
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf '[bench] %s\n' "$*"; }

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
OUT=target/bench/summary
mkdir -p "$OUT"
rm -f "$OUT"/*.out "$OUT"/*.status
QUICK=${BENCH_QUICK:-0}
SKIP=" ${BENCH_SKIP:-} "
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# run NAME COMMAND...: runs one benchmark, keeps its output and exit status, never stops the rest.
run() {
  local name=$1
  shift
  if [[ "$SKIP" == *" $name "* ]]; then
    log "skipping $name (BENCH_SKIP)"
    echo skipped >"$OUT/$name.status"
    return
  fi
  log "=== $name: $* ==="
  local started=$SECONDS
  if "$@" 2>&1 | tee "$OUT/$name.out"; then
    echo "ok $((SECONDS - started))" >"$OUT/$name.status"
  else
    echo "failed $((SECONDS - started))" >"$OUT/$name.status"
    log "$name failed (see $OUT/$name.out); going on with the others"
  fi
}

if [ "$QUICK" = 1 ]; then
  log "quick mode: shortened settings, figures only prove the benchmarks run"
  run messaging cargo run --release -p integration-tests --bin bench-messaging -- \
    --backend both --url "$AMQP_URL" --embedded-file target/bench/messaging.db \
    --events 5000 --batch-sizes 1,64
  BENCH_INGEST_RUNS=${BENCH_INGEST_RUNS:-"2000:5 5000:5"} run ingest bash scripts/bench-ingest.sh
  BENCH_E2E_RUNS=${BENCH_E2E_RUNS:-"100:5"} run e2e bash scripts/bench-e2e.sh
else
  run messaging make -s bench-messaging
  run ingest bash scripts/bench-ingest.sh
  run e2e bash scripts/bench-e2e.sh
fi
# The recovery case: its test prints `RECOVERY ...` and the invariant checker's verdict.
cargo build --workspace --bins --tests
run recovery cargo nextest run --workspace \
  -E 'binary_id(integration-tests::chaos) and test(=scheduler_kill_under_load)' --no-capture

machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), \
$(free -g | awk '/^Mem:/ {print $2}') GB RAM, $(uname -sr)"
postgres=$(psql "$DATABASE_URL" -Atc 'show server_version' 2>/dev/null || echo '?')
rabbitmq=$(rabbitmqctl -q version 2>/dev/null || echo '?')
python3 scripts/bench_summary.py --dir "$OUT" --doc docs/BENCHMARKS.md --machine "$machine" \
  --postgres "$postgres" --rabbitmq "$rabbitmq" --quick "$QUICK" \
  --load "$LOAD_START"
log "summary written to docs/BENCHMARKS.md; full outputs in $OUT/"
! grep -q '^failed' "$OUT"/*.status
