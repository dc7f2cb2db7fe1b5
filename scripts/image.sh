#!/usr/bin/env bash
# `make image`: the suite's image (Dockerfile), tagged $IMAGE (default drone-delivery:dev).
#   IMAGE_BASES=local     (default) build local base images from Debian's packages and this
#                         machine's Rust toolchain first (scripts/docker-base.sh) and use them
#   IMAGE_BASES=upstream  the Dockerfile's defaults (rust:<version>-bookworm, distroless), pulled
#                         from their registries
# The build compiles the workspace in release mode inside the builder (crates from crates.io over
# the host's network; BuildKit keeps the registry and target/ in its cache between builds).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/docker-env.sh
source scripts/docker-env.sh
log() { printf '[image] %s\n' "$*"; }

IMAGE=${IMAGE:-drone-delivery:dev}
docker_up
args=()
if [ "${IMAGE_BASES:-local}" = local ]; then
  bash scripts/docker-base.sh build
  args+=(--build-arg "BUILDER_IMAGE=$BASE_RUST_IMAGE" --build-arg "RUNTIME_IMAGE=$BASE_RUNTIME_IMAGE")
fi
started=$SECONDS
log "docker build $IMAGE (release build of the eight services inside the builder)"
if ! "$DOCKER" build --progress plain --network host "${args[@]}" -t "$IMAGE" . \
  >target/image-build.log 2>&1; then
  log "the build failed; the end of target/image-build.log:"
  tail -n 40 target/image-build.log
  exit 1
fi
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
log "$IMAGE built in $((SECONDS - started)) s; $((size / 1000000)) MB ($(
  "$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19))"
