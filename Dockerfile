# One image with every service binary of the suite (see README, "Run it in containers"):
#   docker build --network host -t registry.example.com/drone-delivery:0.1.0 .
# Each container picks its service with `command: ["/usr/local/bin/<service>"]`.
#
# The two base images are build arguments. Their defaults are the usual upstream images; a
# machine that reaches no image registry builds local stand-ins from Debian's packages first
# (`make image` does: scripts/docker-base.sh) and passes them in:
#   BUILDER_IMAGE  a Rust toolchain (cargo, rustc) with a C compiler (aws-lc-sys, SQLite)
#   RUNTIME_IMAGE  glibc, libgcc, CA certificates and tzdata, running as uid 65532
# BuildKit is required (the cache mounts below): Docker 23+ with buildx, or DOCKER_BUILDKIT=1.

ARG RUST_VERSION=1.95
ARG BUILDER_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- build -----------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binaries are copied out of the
# cached target/ because it is not part of the image layer. Crates come from crates.io, so the
# build needs the network (`--network host` where containers reach nothing else).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p account -p package -p thirdparty -p drone -p delivery -p ingestion -p scheduler \
      -p supervisor --bins \
 && mkdir -p /out \
 && for bin in account package thirdparty drone delivery ingestion scheduler supervisor; do \
      cp "target/release/$bin" "/out/$bin"; \
    done

# ---- runtime ---------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
WORKDIR /home/nonroot
# Production settings come from APP_ environment variables (ConfigMaps and Secrets); without
# them a service would fall back to SQLite files under ./data, which a read-only root
# filesystem refuses — by design.
ENV RUST_BACKTRACE=1
EXPOSE 8080 8081 8082 8083 8084 8085 8086 8087
# No default service: the orchestrator names the binary.
ENTRYPOINT []
CMD ["/usr/local/bin/ingestion"]
