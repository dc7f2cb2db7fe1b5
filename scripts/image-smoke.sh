#!/usr/bin/env bash
# `make image-smoke`: the suite's image, run as the chart runs it. Builds the image (make image),
# then starts each of the eight services as its own container — user 65532, read-only root
# filesystem with a tmpfs on /tmp (the chart's emptyDir), every capability dropped, no privilege
# escalation, Docker's default seccomp profile — on the host network against this machine's
# PostgreSQL (a fresh database per service) and RabbitMQ (a fresh queue prefix), configured by
# APP_ variables as the chart's ConfigMaps and Secrets do. It checks those settings on each
# running process (/proc: uid, capabilities, no_new_privs), waits for every /readyz (timing each
# start), books one delivery through Ingestion with a client token minted by Account, and waits
# until the booking is `scheduled`. Everything it started is removed at the end, also on failure:
# containers, databases and queues.
#
#   IMAGE             the image (default drone-delivery:dev)
#   SMOKE_PORT        first of eight consecutive ports on 127.0.0.1 (default 28080)
#   SMOKE_BUILD=0     use the image as it is instead of running make image first
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/docker-env.sh
source scripts/docker-env.sh
log() { printf '[image-smoke] %s\n' "$*"; }

IMAGE=${IMAGE:-drone-delivery:dev}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
BASE_PORT=${SMOKE_PORT:-28080}
SUFFIX=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
PREFIX="smoke-$SUFFIX"
SECRET="smoke-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SERVICE_TOKEN="svc-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
PARTITIONS=4
SERVICES=(account package thirdparty drone delivery ingestion scheduler supervisor)
declare -A PORT=(
  [ingestion]=$BASE_PORT [account]=$((BASE_PORT + 1)) [package]=$((BASE_PORT + 2))
  [drone]=$((BASE_PORT + 3)) [delivery]=$((BASE_PORT + 4)) [scheduler]=$((BASE_PORT + 5))
  [supervisor]=$((BASE_PORT + 6)) [thirdparty]=$((BASE_PORT + 7))
)
declare -A DB POLLER
CONTAINERS=()
READY_DIR=$(mktemp -d)

# shellcheck source=scripts/db-url.sh
source scripts/db-url.sh
url() { printf 'http://127.0.0.1:%s' "${PORT[$1]}"; }
now_ms() { date +%s%3N; }

docker_up
if [ "${SMOKE_BUILD:-1}" != 0 ]; then
  bash scripts/image.sh
fi
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || { log "no image $IMAGE: run make image"; exit 1; }
for svc in "${SERVICES[@]}"; do
  if curl -s -o /dev/null "$(url "$svc")/healthz"; then
    log "port ${PORT[$svc]} ($svc) is taken; stop what listens there or set SMOKE_PORT"
    exit 1
  fi
done

cleanup() {
  local status=$?
  local poller
  for poller in "${POLLER[@]}"; do kill "$poller" 2>/dev/null || true; done
  if [ "$status" != 0 ]; then
    for c in "${CONTAINERS[@]}"; do
      log "the end of $c's log:"
      "$DOCKER" logs --tail 15 "$c" 2>&1 | sed 's/^/    /' || true
    done
  fi
  [ ${#CONTAINERS[@]} -eq 0 ] || "$DOCKER" rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
  for db in "${DB[@]}"; do
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      || log "could not drop database $db"
  done
  # The queues and streams of this run's prefix.
  if command -v rabbitmqctl >/dev/null 2>&1; then
    rabbitmqctl list_queues -q name 2>/dev/null | grep "^$PREFIX" | while read -r queue; do
      rabbitmqctl delete_queue "$queue" </dev/null >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$READY_DIR"
  log "removed the containers, databases smoke_<service>_$SUFFIX and queues $PREFIX*"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run SERVICE VAR=VALUE... : the service's container, configured by the environment only.
run() {
  local svc=$1 name="dd-smoke-$1-$SUFFIX"
  shift
  local env=(
    -e APP_HTTP__HOST=127.0.0.1 -e "APP_HTTP__PORT=${PORT[$svc]}"
    -e "APP_DATABASE__URL=$(db_url "${DB[$svc]}")" -e APP_DATABASE__MAX_CONNECTIONS=4
    -e APP_DATABASE__MIGRATE_ON_START=true -e "APP_AUTH__SERVICE_TOKEN=$SERVICE_TOKEN"
    -e RUST_LOG=info
  )
  local kv
  for kv in "$@"; do env+=(-e "$kv"); done
  "$DOCKER" run -d --name "$name" --network host \
    --user 65532:65532 --read-only --tmpfs /tmp:rw,noexec,nosuid,size=64m \
    --cap-drop ALL --security-opt no-new-privileges \
    "${env[@]}" "$IMAGE" "/usr/local/bin/$svc" >/dev/null
  CONTAINERS+=("$name")
  poll_ready "$svc" "$name" &
  POLLER[$svc]=$!
}

# poll_ready SERVICE CONTAINER: writes the time (ms) of the first 200 on /readyz to
# $READY_DIR/SERVICE; fails after 60 s or when the container stops.
poll_ready() {
  local svc=$1 name=$2 deadline=$(( $(now_ms) + 60000 )) round=0
  while [ "$(now_ms)" -lt "$deadline" ]; do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$(url "$svc")/readyz")" = 200 ]; then
      now_ms > "$READY_DIR/$svc"
      return 0
    fi
    round=$((round + 1))
    if [ $((round % 25)) = 0 ] && [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$name")" != true ]; then
      echo "the container stopped" > "$READY_DIR/$svc"
      return 1
    fi
    sleep 0.02
  done
  echo "not ready after 60 s" > "$READY_DIR/$svc"
  return 1
}

log "image $IMAGE: $(( $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE") / 1000000 )) MB"
for svc in "${SERVICES[@]}"; do
  DB[$svc]="smoke_${svc}_$SUFFIX"
  psql "$DATABASE_URL" -qc "CREATE DATABASE \"${DB[$svc]}\"" >/dev/null
done
messaging=(APP_MESSAGING__URL="$AMQP_URL" APP_MESSAGING__PREFIX="$PREFIX")
downstream=(APP_DOWNSTREAM__ACCOUNT_URL="$(url account)" APP_DOWNSTREAM__PACKAGE_URL="$(url package)"
  APP_DOWNSTREAM__DRONE_URL="$(url drone)" APP_DOWNSTREAM__DELIVERY_URL="$(url delivery)"
  APP_DOWNSTREAM__THIRDPARTY_URL="$(url thirdparty)")
run account "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-account" \
  APP_AUTH__JWT_SECRET="$SECRET"
run package
run thirdparty
run drone
run delivery "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-delivery" \
  APP_TRACKING__PARTITIONS=$PARTITIONS
run ingestion "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-ingestion" \
  APP_AUTH__JWT_SECRET="$SECRET" APP_INGESTION__PARTITIONS=$PARTITIONS
run scheduler "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-scheduler" "${downstream[@]}" \
  APP_SCHEDULER__PARTITIONS=$PARTITIONS APP_SCHEDULER__REPLICAS=1 APP_SCHEDULER__ORDINAL=0 \
  APP_SCHEDULER__INSTANCE_ID="scheduler-0"
run supervisor "${messaging[@]}" APP_MESSAGING__CONNECTION_NAME="$PREFIX-supervisor" "${downstream[@]}" \
  APP_SUPERVISOR__PARTITIONS=$PARTITIONS APP_SCHEDULER__REPLICAS=1 \
  APP_SCHEDULER__URL="$(url scheduler)" \
  APP_SCHEDULER__INSTANCE_URL_TEMPLATE="http://127.0.0.1:${PORT[scheduler]}"

# Every /readyz. A service's start-up time runs from its process's start (the container's
# StartedAt) to its first 200 on /readyz; a poller per service starts right after its
# `docker run` (see run) and asks every 20 ms.
for svc in "${SERVICES[@]}"; do
  if ! wait "${POLLER[$svc]}"; then
    log "$svc did not get ready: $(cat "$READY_DIR/$svc" 2>/dev/null)"
    exit 1
  fi
done
log "ready; start-up time (process start to the first 200 on /readyz, migrations included):"
for svc in "${SERVICES[@]}"; do
  started=$(date -d "$("$DOCKER" inspect -f '{{.State.StartedAt}}' "dd-smoke-$svc-$SUFFIX")" +%s%3N)
  log "  $svc $(( $(cat "$READY_DIR/$svc") - started )) ms"
done

# The chart's security settings, read off each running process.
for svc in "${SERVICES[@]}"; do
  name="dd-smoke-$svc-$SUFFIX"
  pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$name")
  uid=$(awk '/^Uid:/ {print $2 ":" $3}' "/proc/$pid/status")
  gid=$(awk '/^Gid:/ {print $2}' "/proc/$pid/status")
  capeff=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
  capbnd=$(awk '/^CapBnd:/ {print $2}' "/proc/$pid/status")
  nnp=$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")
  seccomp=$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")
  readonly=$("$DOCKER" inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$name")
  if [ "$uid" != 65532:65532 ] || [ "$gid" != 65532 ] || [ "$capeff" != 0000000000000000 ] \
    || [ "$capbnd" != 0000000000000000 ] || [ "$nnp" != 1 ] || [ "$seccomp" != 2 ] \
    || [ "$readonly" != true ]; then
    log "$svc does not run as the chart says: uid $uid gid $gid CapEff $capeff CapBnd $capbnd \
NoNewPrivs $nnp Seccomp $seccomp read-only $readonly"
    exit 1
  fi
done
log "every service runs as 65532:65532, no capabilities, no_new_privs, seccomp filter, read-only root"

# One booking, end to end.
curl -sf -X PUT "$(url account)/api/accounts/smoke-account" -H "Authorization: Bearer $SERVICE_TOKEN" \
  -H 'content-type: application/json' -d '{"name":"Image smoke test"}' >/dev/null
token=$(curl -sf -X POST "$(url account)/api/accounts/smoke-account/tokens" \
  -H "Authorization: Bearer $SERVICE_TOKEN" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
[ -n "$token" ] || { log "Account minted no client token"; exit 1; }
pickup=$(date -u -d '+30 days' '+%Y-%m-%dT10:00:00Z')
booked_at=$(now_ms)
accepted=$(curl -sf -X POST "$(url ingestion)/api/deliveryrequests" \
  -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -H "Idempotency-Key: smoke-$SUFFIX" \
  -d "{\"ownerId\":\"smoke-account\",\"pickupLocation\":\"1 Main St\",\"dropOffLocation\":\"2 Side St\",
  \"pickupTime\":\"$pickup\",\"deadline\":\"\",\"expedited\":false,\"confirmationRequired\":\"None\",
  \"packageInfo\":{\"packageId\":\"smoke-$SUFFIX\",\"size\":\"Small\",\"weight\":2.5}}")
id=$(printf '%s' "$accepted" | sed -n 's/.*"deliveryId":"\([^"]*\)".*/\1/p')
[ -n "$id" ] || { log "Ingestion did not accept the booking: $accepted"; exit 1; }
log "booked delivery $id"
state=""
for _ in $(seq 1 300); do
  status=$(curl -s "$(url ingestion)/api/deliveryrequests/$id" -H "Authorization: Bearer $token")
  state=$(printf '%s' "$status" | sed -n 's/.*"state":"\([^"]*\)".*/\1/p')
  case "$state" in
    scheduled | Scheduled) break ;;
    failed | Failed | compensated | Compensated)
      log "the booking ended $state: $status"
      exit 1
      ;;
  esac
  sleep 0.1
done
case "$state" in
  scheduled | Scheduled) ;;
  *) log "the booking is still '$state' after 30 s: $status"; exit 1 ;;
esac
log "delivery $id is $state $(( $(now_ms) - booked_at )) ms after booking"
log "image smoke test passed"
