# Stand-in for rust:<version>-bookworm: Debian minbase, a C toolchain and this machine's Rust
# toolchain (cargo, rustc, the standard library), copied into the context by
# scripts/docker-base.sh, with the extra CA certificates this machine trusts (a TLS-inspecting
# egress proxy, say), so cargo reaches crates.io from the build as it does from the machine.
# Same layout as the upstream image: CARGO_HOME=/usr/local/cargo.
ARG BASE_IMAGE=drone-delivery-base/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make perl pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
COPY toolchain/ /usr/local/rust/
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && rustc --version && cargo --version
