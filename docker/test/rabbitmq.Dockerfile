# Stand-in for the upstream `rabbitmq:<version>-management` image that testcontainers-modules
# starts, made from Debian's RabbitMQ 3.10 for a machine that reaches no image registry
# (`make test-containers`): the management and Prometheus plugins enabled (the module waits for
# "Server startup complete; 4 plugins started." on stdout), logs on stdout, and guest/guest
# allowed from other hosts, as upstream configures it.
ARG BASE_IMAGE=drone-delivery-base/debian:bookworm
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins --offline enable rabbitmq_management rabbitmq_prometheus \
 && printf 'loopback_users.guest = false\nlisteners.tcp.default = 5672\nmanagement.tcp.port = 15672\n' \
      > /etc/rabbitmq/rabbitmq.conf \
 && rm -rf /var/lib/rabbitmq/mnesia /var/log/rabbitmq/*
ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq
USER rabbitmq
EXPOSE 5672 15672
# Debian's /usr/sbin/rabbitmq-server wrapper sends the output to a file; the real script logs here.
WORKDIR /var/lib/rabbitmq
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
