#!/usr/bin/env bash
# `make chaos`: the chaos cases of integration-tests/src/harness/chaos.rs, run by the `chaos` binary — the seven services as real
# processes under a steady booking load while a Scheduler is kill -9ed and restarted (and paused
# past its lease), the Supervisor is killed mid-compensation, each domain service is restarted,
# RabbitMQ is restarted, downstream calls fail or answer slowly, and Package fails for 30 s
# (CHAOS_OUTAGE_SECS) behind the Scheduler's circuit breaker; the invariant checker runs after
# each. One case at a time, so each fault is the only one.
#
# RabbitMQ: by default a private node (chaos@localhost on 127.0.0.1:$CHAOS_AMQP_PORT, data under
# target/chaos/rabbitmq) is started for the run and stopped after it, so restarting the broker
# disturbs no other test or benchmark on the machine. CHAOS_RABBITMQ=shared uses AMQP_URL and
# rabbitmqctl's default node instead (RABBITMQ_NODE to name another) — that node is restarted.
#
#   CHAOS_SECS       load length per case in seconds (default 30)
#   CHAOS_RATE       bookings per second (default 20)
#   CHAOS_FILTER     case names, e.g. "rabbitmq_restart downstream_faults" (default: every case;
#                    target/debug/chaos --list prints them)
#   CHAOS_AMQP_PORT  port of the private node (default 5673)
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf '[chaos] %s\n' "$*"; }

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
DIR=target/chaos
mkdir -p "$DIR"
PORT=${CHAOS_AMQP_PORT:-5673}
NODE=""

stop_node() {
  if [ -n "$NODE" ]; then
    rabbitmqctl -n "$NODE" -q stop >/dev/null 2>&1 || true
    log "private RabbitMQ node $NODE stopped"
  fi
}
trap stop_node EXIT

if [ "${CHAOS_RABBITMQ:-private}" = private ]; then
  NODE="chaos@localhost"
  RDIR="$PWD/$DIR/rabbitmq"
  if rabbitmqctl -n "$NODE" -q ping >/dev/null 2>&1; then
    log "a node $NODE is already running; stopping it first"
    rabbitmqctl -n "$NODE" -q stop >/dev/null 2>&1 || true
  fi
  rm -rf "$RDIR"
  mkdir -p "$RDIR/mnesia" "$RDIR/log"
  echo "listeners.tcp.local = 127.0.0.1:$PORT" >"$RDIR/rabbitmq.conf"
  echo '[].' >"$RDIR/enabled_plugins"
  # rabbitmq-server runs as the rabbitmq user when started as root.
  if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq:rabbitmq "$RDIR"; fi
  log "starting a private RabbitMQ node $NODE on 127.0.0.1:$PORT"
  env RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT=$((PORT + 20000)) \
    RABBITMQ_CONFIG_FILE="$RDIR/rabbitmq.conf" RABBITMQ_MNESIA_BASE="$RDIR/mnesia" \
    RABBITMQ_LOG_BASE="$RDIR/log" RABBITMQ_PID_FILE="$RDIR/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RDIR/enabled_plugins" \
    nohup rabbitmq-server >"$RDIR/server.out" 2>&1 &
  for _ in $(seq 1 120); do
    rabbitmqctl -n "$NODE" -q ping >/dev/null 2>&1 && break
    sleep 1
  done
  rabbitmqctl -n "$NODE" -q await_startup --timeout 120 \
    || { log "the private node did not start; its output:"; tail -n 30 "$RDIR/server.out"; exit 1; }
  export AMQP_URL="amqp://guest:guest@127.0.0.1:$PORT/%2f"
  export RABBITMQ_NODE="$NODE"
else
  log "using the shared RabbitMQ at $AMQP_URL (node ${RABBITMQ_NODE:-default}): it will be restarted"
fi

# The service binaries and the chaos runner, built as `make test` builds them (with the tests:
# the same features, so neither rebuilds the other's dependencies).
cargo build --workspace --bins --tests
TARGET=${CARGO_TARGET_DIR:-target}
cases=()
[ -z "${CHAOS_FILTER:-}" ] || read -r -a cases <<<"${CHAOS_FILTER}"
started=$SECONDS
status=0
# pipefail: the pipeline fails with the chaos binary's status (tee succeeds).
"$TARGET/debug/chaos" "${cases[@]}" 2>&1 | tee "$DIR/chaos.out" || status=$?
echo
log "recovery times and verdicts (full output in $DIR/chaos.out, $((SECONDS - started)) s):"
grep -E '^RECOVERY|invariants hold|invariant violations|^PASS |^FAIL |^failed chaos' "$DIR/chaos.out" || true
exit "$status"
