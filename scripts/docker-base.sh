#!/usr/bin/env bash
# Local base images for a machine that reaches no image registry, made from Debian's packages
# (mmdebstrap) and this machine's Rust toolchain:
#   drone-delivery-base/debian:bookworm   Debian 12 minbase + CA certificates + tzdata (imported)
#   drone-delivery-base/rust:<rustc>      stand-in for rust:<version>-bookworm (the builder)
#   drone-delivery-base/runtime:bookworm  stand-in for distroless/cc-debian12:nonroot: only the
#                                         files of libc6, libgcc-s1, ca-certificates, tzdata,
#                                         base-files and netbase (no shell, no package manager)
#   drone-delivery-test/postgres:15       stand-in for the testcontainers-modules postgres image
#   drone-delivery-test/rabbitmq:3.10     stand-in for the testcontainers-modules rabbitmq image
# Each image is made once: an image the engine already has is kept, and every image is saved
# under target/docker-base/ so a new engine on this checkout loads it instead of rebuilding.
#
#   scripts/docker-base.sh [build|test|all]   (default all; build = the first three)
#   DOCKER_BASE_REBUILD=1                      makes them again
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/docker-env.sh
source scripts/docker-env.sh
log() { printf '[docker-base] %s\n' "$*"; }

CACHE=target/docker-base
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN=$BASE_DEBIAN_IMAGE
RUST=$BASE_RUST_IMAGE
RUNTIME=$BASE_RUNTIME_IMAGE
TEST_POSTGRES=$STANDIN_POSTGRES_IMAGE
TEST_RABBITMQ=$STANDIN_RABBITMQ_IMAGE
mkdir -p "$CACHE"
docker_up

have() { [ "${DOCKER_BASE_REBUILD:-0}" != 1 ] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
archive() { printf '%s/%s.tar' "$CACHE" "$(printf '%s' "$1" | tr '/:' '__')"; }

# ensure IMAGE MAKER: keeps the engine's image, else loads the saved one, else makes and saves it.
ensure() {
  local image=$1 maker=$2 tar
  tar=$(archive "$image")
  if have "$image"; then
    log "$image: present"
    return
  fi
  if [ "${DOCKER_BASE_REBUILD:-0}" != 1 ] && [ -s "$tar" ]; then
    log "$image: loading $tar"
    "$DOCKER" load -i "$tar" >/dev/null
    return
  fi
  local started=$SECONDS
  "$maker"
  "$DOCKER" save -o "$tar.part" "$image" && mv "$tar.part" "$tar"
  log "$image: made in $((SECONDS - started)) s, saved to $tar"
}

make_debian() {
  command -v mmdebstrap >/dev/null 2>&1 || docker_apt_install mmdebstrap
  log "$DEBIAN: mmdebstrap --variant=minbase bookworm from $MIRROR"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates,tzdata \
    bookworm "$CACHE/debian-bookworm.rootfs.tar" "$MIRROR"
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "$CACHE/debian-bookworm.rootfs.tar" "$DEBIAN" >/dev/null
  rm -f "$CACHE/debian-bookworm.rootfs.tar"
}

build_from() { # build_from IMAGE DOCKERFILE CONTEXT
  log "$1: docker build -f $2"
  "$DOCKER" build --quiet --network host --build-arg "BASE_IMAGE=$DEBIAN" -t "$1" -f "$2" "$3" >/dev/null
}

make_rust() {
  local sysroot context=$CACHE/rust-context
  sysroot=$(rustc --print sysroot)
  rm -rf "$context"
  mkdir -p "$context/toolchain/bin" "$context/toolchain/lib"
  # cargo, rustc and the standard library; no docs, no other components.
  cp -a "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$sysroot/bin/rustdoc" "$context/toolchain/bin/"
  cp -a "$sysroot/lib/." "$context/toolchain/lib/"
  mkdir -p "$context/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$context/ca-certificates/" 2>/dev/null || true
  cp docker/base/rust.Dockerfile "$context/Dockerfile"
  build_from "$RUST" "$context/Dockerfile" "$context"
  rm -rf "$context"
}
# Like distroless: Debian's packages unpacked without their maintainer scripts, so no shell or
# dpkg comes along; the CA bundle is concatenated as update-ca-certificates would; users root and
# nonroot (65532), the default user.
make_runtime() {
  local root=$CACHE/runtime-rootfs
  log "$RUNTIME: mmdebstrap --variant=extract (libc6 libgcc-s1 ca-certificates tzdata)"
  rm -rf "$root"
  # (The extract variant runs no hooks, so the finishing touches are made on the directory.)
  mmdebstrap --quiet --variant=extract \
    --include=base-files,netbase,tzdata,ca-certificates,libc6,libgcc-s1 \
    bookworm "$root" "$MIRROR"
  mkdir -p "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt > "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    > "$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
  tar -C "$root" -c . | "$DOCKER" import --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' - "$RUNTIME" >/dev/null
  rm -rf "$root"
}
make_test_postgres() { build_from "$TEST_POSTGRES" docker/test/postgres.Dockerfile docker/test; }
make_test_rabbitmq() { build_from "$TEST_RABBITMQ" docker/test/rabbitmq.Dockerfile docker/test; }

what=${1:-all}
ensure "$DEBIAN" make_debian
case "$what" in
  build | all)
    ensure "$RUST" make_rust
    ensure "$RUNTIME" make_runtime
    ;;&
  test | all)
    ensure "$TEST_POSTGRES" make_test_postgres
    ensure "$TEST_RABBITMQ" make_test_rabbitmq
    ;;
  build) ;;
  *) log "unknown argument $what (build, test or all)"; exit 2 ;;
esac
