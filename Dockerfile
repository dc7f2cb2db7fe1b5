# syntax=docker/dockerfile:1.7
# One image with every service binary of the suite (see README, "Deploy to Kubernetes"):
#   docker build -t registry.example.com/drone-delivery:0.1.0 .
# Each Kubernetes container picks its service with `command: ["/usr/local/bin/<service>"]`.

ARG RUST_VERSION=1.95

# ---- build -----------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
# aws-lc-sys (rustls' crypto) builds C code: a C compiler, cmake and perl.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang perl pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds (BuildKit); the binaries are copied
# out of the cached target/ because it is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p account -p package -p drone -p delivery -p ingestion -p scheduler -p supervisor --bins \
 && mkdir -p /out \
 && for bin in account package drone delivery ingestion scheduler supervisor; do \
      cp "target/release/$bin" "/out/$bin"; \
    done

# ---- runtime ---------------------------------------------------------------------------------
# glibc, libgcc, CA certificates and tzdata, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
WORKDIR /home/nonroot
# Production settings come from APP_ environment variables (ConfigMaps and Secrets); without
# them a service would fall back to SQLite files under ./data, which a read-only root
# filesystem refuses — by design.
ENV RUST_BACKTRACE=1
EXPOSE 8080 8081 8082 8083 8084 8085 8086
# No default service: the orchestrator names the binary.
ENTRYPOINT []
CMD ["/usr/local/bin/ingestion"]
