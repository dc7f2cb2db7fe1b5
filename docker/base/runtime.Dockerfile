# Stand-in for gcr.io/distroless/cc-debian12:nonroot: Debian minbase (glibc, libgcc, CA
# certificates, tzdata) with the distroless `nonroot` user (65532) as the default user. Unlike
# distroless it keeps Debian's shell and dpkg; the chart's settings (non-root, read-only root
# filesystem, no capabilities) are what the smoke run checks.
ARG BASE_IMAGE=drone-delivery-base/debian:bookworm
FROM ${BASE_IMAGE}
RUN echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >> /etc/passwd \
 && echo 'nonroot:x:65532:' >> /etc/group \
 && mkdir -p /home/nonroot && chown 65532:65532 /home/nonroot \
 && rm -rf /var/cache/apt/* /var/lib/apt/lists/*
USER 65532:65532
WORKDIR /home/nonroot
