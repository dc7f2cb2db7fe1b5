# Sourced by the container scripts: a running Docker engine and a client that builds with
# BuildKit, in $DOCKER. Installs Debian's docker.io and starts dockerd when they are missing (as
# root, on a machine like CI's); elsewhere it says what to do.
#   DOCKER  the client to use (default: the first `docker` on PATH that can build with BuildKit:
#           one with the buildx plugin, or a client older than 23 whose builder is BuildKit)

docker_log() { printf '[docker] %s\n' "$*" >&2; }

# The local images scripts/docker-base.sh makes (the builder is tagged with this machine's rustc).
BASE_DEBIAN_IMAGE=drone-delivery-base/debian:bookworm
BASE_RUST_IMAGE=drone-delivery-base/rust:$(rustc --version | cut -d' ' -f2)
BASE_RUNTIME_IMAGE=drone-delivery-base/runtime:bookworm
STANDIN_POSTGRES_IMAGE=drone-delivery-test/postgres:15
STANDIN_RABBITMQ_IMAGE=drone-delivery-test/rabbitmq:3.10

# Installs Debian packages (as root), refreshing the package lists only when needed.
docker_apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

docker_client_builds() {
  local client=$1 major
  "$client" buildx version >/dev/null 2>&1 && return 0
  major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
  [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null
}

docker_up() {
  # An engine that already answers (local or DOCKER_HOST) is used as it is; otherwise this
  # machine needs dockerd.
  if ! command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      docker_log "installing Debian's docker.io"
      docker_apt_install docker.io
    else
      docker_log "no Docker here: install Docker (the engine and a client with buildx)"
      return 1
    fi
  fi
  if [ -z "${DOCKER:-}" ]; then
    local candidate
    for candidate in $(type -ap docker); do
      if docker_client_builds "$candidate"; then DOCKER=$candidate; break; fi
    done
    if [ -z "${DOCKER:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
      && ! dpkg -s docker.io >/dev/null 2>&1; then
      docker_apt_install docker.io
      docker_client_builds /usr/bin/docker && DOCKER=/usr/bin/docker
    fi
    if [ -z "${DOCKER:-}" ]; then
      docker_log "no docker client here builds with BuildKit: install the buildx plugin"
      return 1
    fi
  fi
  export DOCKER DOCKER_BUILDKIT=1
  if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null 2>&1; then
    docker_log "the Docker engine does not answer: start it (e.g. sudo systemctl start docker)"
    return 1
  fi
  mkdir -p target
  docker_log "starting dockerd (log: target/dockerd.log)"
  setsid dockerd >target/dockerd.log 2>&1 < /dev/null &
  local _
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    sleep 1
  done
  docker_log "dockerd did not answer within 60 s; the end of target/dockerd.log:"
  tail -n 20 target/dockerd.log >&2
  return 1
}
