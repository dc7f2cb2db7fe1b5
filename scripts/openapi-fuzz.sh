#!/usr/bin/env bash
# `make openapi-fuzz`: checks that every service's OpenAPI document tells the truth. Builds the
# standalone suite (every service in one process on embedded defaults, as `make run`), starts it on
# free ports with a fresh data directory, mints the credentials each API needs, then runs
# schemathesis (property-based: schema-valid and schema-invalid requests generated from each
# document, with a fixed seed) against the document of every service, with every check enabled
# (schemathesis.toml: `[checks] enabled = true`, the equivalent of `--checks all` that still lets an
# operation's narrow exception apply, which the command-line option would override): no 5xx, every status, content type, header and body as documented,
# schema-invalid requests refused, schema-valid ones not refused as malformed. Prints a summary
# per service and exits non-zero on any failure; the suite is always stopped.
#
#   FUZZ_EXAMPLES   test cases per operation and phase (default 100)
#   FUZZ_SEED       schemathesis seed (default 20261206)
#   FUZZ_SERVICES   the services to check (default: all eight)
#   FUZZ_BUILD      0 runs $CARGO_TARGET_DIR/debug/standalone as it is (default 1: cargo build)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '[openapi-fuzz] %s\n' "$*"; }

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${FUZZ_EXAMPLES:-100}
SEED=${FUZZ_SEED:-20261206}
SERVICES=(${FUZZ_SERVICES:-ingestion account package thirdparty drone delivery scheduler supervisor})
TARGET=${CARGO_TARGET_DIR:-target}
DIR=target/openapi-fuzz
VENV=$DIR/venv
started=$(date +%s)

mkdir -p "$DIR"
if [ ! -x "$VENV/bin/st" ] || [ "$("$VENV/bin/st" --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

if [ "${FUZZ_BUILD:-1}" != 0 ]; then
  log "building the standalone suite"
  cargo build -p standalone
fi

DATA=$(mktemp -d "${TMPDIR:-/tmp}/openapi-fuzz.XXXXXX")
PID=""
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -INT "$PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PID" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Eight free ports: bound to port 0 by the kernel, then released for the suite.
read -r -a FREE <<<"$(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
declare -A PORT=(
  [ingestion]=${FREE[0]} [account]=${FREE[1]} [package]=${FREE[2]} [drone]=${FREE[3]}
  [delivery]=${FREE[4]} [scheduler]=${FREE[5]} [supervisor]=${FREE[6]} [thirdparty]=${FREE[7]}
)
url() { printf 'http://127.0.0.1:%s' "${PORT[$1]}"; }

log "starting the suite (data in $DATA, log in $DIR/standalone.log)"
env APP_DATA_DIR="$DATA" APP_HOST=127.0.0.1 \
  APP_PORTS__INGESTION="${PORT[ingestion]}" APP_PORTS__ACCOUNT="${PORT[account]}" \
  APP_PORTS__PACKAGE="${PORT[package]}" APP_PORTS__DRONE="${PORT[drone]}" \
  APP_PORTS__DELIVERY="${PORT[delivery]}" APP_PORTS__SCHEDULER="${PORT[scheduler]}" \
  APP_PORTS__SUPERVISOR="${PORT[supervisor]}" APP_PORTS__THIRDPARTY="${PORT[thirdparty]}" \
  RUST_LOG="${FUZZ_LOG:-warn}" \
  "$TARGET/debug/standalone" >"$DIR/standalone.log" 2>&1 &
PID=$!

# Ready once credentials.env is written (every service started) and every /readyz answers 200.
for _ in $(seq 1 600); do
  kill -0 "$PID" 2>/dev/null || { tail -20 "$DIR/standalone.log"; log "the suite stopped"; exit 1; }
  if grep -q '^CLIENT_TOKEN=' "$DATA/credentials.env" 2>/dev/null; then
    ready=1
    for svc in "${SERVICES[@]}"; do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "$(url "$svc")/readyz")" = 200 ] || ready=0
    done
    [ "$ready" = 1 ] && break
  fi
  sleep 0.1
done
[ "${ready:-0}" = 1 ] || { tail -20 "$DIR/standalone.log"; log "the suite did not get ready"; exit 1; }

SERVICE_TOKEN=$(sed -n "s/^SERVICE_TOKEN='\(.*\)'$/\1/p" "$DATA/credentials.env")
# Ingestion's client JWT, from the Account service's token endpoint. The admin scope lets it book
# for any ownerId the fuzzer makes up (a plain token gets 403 for every other owner, and the
# booking path would never be reached).
curl -sf -X PUT "$(url account)/api/accounts/openapi-fuzz" -H "Authorization: Bearer $SERVICE_TOKEN" \
  -H 'Content-Type: application/json' -d '{"name":"openapi-fuzz","status":"active"}' >/dev/null
CLIENT_TOKEN=$(curl -sf -X POST "$(url account)/api/accounts/openapi-fuzz/tokens" \
  -H "Authorization: Bearer $SERVICE_TOKEN" -H 'Content-Type: application/json' \
  -d '{"scopes":["deliveries:admin"],"ttlSeconds":3600}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

declare -A RESULT
failed=0
for svc in "${SERVICES[@]}"; do
  token=$SERVICE_TOKEN
  [ "$svc" = ingestion ] && token=$CLIENT_TOKEN
  log "schemathesis against $svc ($(url "$svc")/openapi.json)"
  set +e
  # Run from target/openapi-fuzz so that the caches schemathesis and Hypothesis write in the
  # current directory stay out of the work tree.
  (cd "$DIR" && exec "$ROOT/$VENV/bin/st" --config-file "$ROOT/schemathesis.toml" --no-color \
    run "$(url "$svc")/openapi.json" \
    --seed "$SEED" --max-examples "$EXAMPLES" --workers 1 \
    --generation-database none \
    -H "Authorization: Bearer $token" \
    --report junit --report-junit-path "$svc.junit.xml") >"$DIR/$svc.log" 2>&1
  rc=$?
  set -e
  # "N generated, M passed" (or "... found K unique failures") and the failures by kind.
  summary=$(awk '/^Test cases:/ {getline; sub(/^ +/, ""); cases = $0}
    /^ +❌ ST/ {sub(/^ +❌ /, ""); kinds = kinds "; " $0}
    END {print cases kinds}' "$DIR/$svc.log")
  if [ "$rc" != 0 ]; then
    failed=1
    RESULT[$svc]="FAILED (exit $rc): $summary"
    sed -n '/^=* FAILURES =*$/,$p' "$DIR/$svc.log" | head -n 150 || true
  else
    RESULT[$svc]="ok: $summary"
  fi
done

log "summary (seed $SEED, at most $EXAMPLES examples per operation; logs in $DIR/<service>.log)"
for svc in "${SERVICES[@]}"; do
  printf '  %-10s %s\n' "$svc" "${RESULT[$svc]}"
done
log "took $(($(date +%s) - started)) s"
exit "$failed"
