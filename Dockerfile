# solo-relay container image: small, non-root, spool on a volume.
#
#   docker build -t solo-relay .
#   docker run --rm --stop-timeout 75 \
#     -p 127.0.0.1:2525:2525 -p 127.0.0.1:9925:9925 \
#     -v solo-relay-spool:/var/lib/solo-relay/spool \
#     -e RELAY_SMTP_ALLOW_NETWORKS=172.17.0.0/16 \
#     -e RELAY_UPSTREAM=smtp://apikey@smtp.example.net:587 \
#     -e RELAY_UPSTREAM_PASSWORD_FILE=/run/secrets/upstream-password \
#     -v "$PWD/upstream-password:/run/secrets/upstream-password:ro" \
#     solo-relay
#
# Configuration is RELAY_* environment only (config/solo-relay.toml lists every
# key; RELAY_CONFIG can name a mounted TOML file instead). Secrets come from
# mounted files: RELAY_UPSTREAM_PASSWORD_FILE, RELAY_UPSTREAM_OAUTH_TOKEN_FILE,
# RELAY_SMTP_USERS_FILE, RELAY_SMTP_TLS_KEY_FILE.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the relay and its dependencies -----
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what the wheel is built from; tests/test_deploy.py copies these same
# paths and runs the same install script in a clean virtual environment.
COPY pyproject.toml README.md ./
COPY relay/ relay/
COPY config/docker/install.sh /usr/local/bin/solo-relay-install
RUN sh /usr/local/bin/solo-relay-install /opt/solo-relay /src

# ---- run: the interpreter, the virtual environment, nothing else ----------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home \
      --home-dir /var/lib/solo-relay --shell /usr/sbin/nologin relay \
 && mkdir -p /var/lib/solo-relay/spool \
 && chown -R 10001:10001 /var/lib/solo-relay
COPY --from=build /opt/solo-relay /opt/solo-relay
COPY config/docker/healthcheck.py /opt/solo-relay/healthcheck.py

# Defaults for a container; override any of them with -e / env.
#  - SMTP and metrics on every interface of the container. The relay refuses a
#    non-loopback listener unless smtp.allow_networks names the clients (or
#    smtp.auth is on): the image allows only 127.0.0.0/8, that is the
#    container's own network namespace (a Kubernetes sidecar shares it with the
#    application). Anyone else must be named: RELAY_SMTP_ALLOW_NETWORKS to the
#    compose network or Docker bridge (docker run: 172.17.0.0/16), never 0.0.0.0/0.
#  - The spool (mail the relay has acknowledged) lives on the declared volume.
#  - Without RELAY_UPSTREAM, copies are written to /var/lib/solo-relay/outbox.
ENV PATH=/opt/solo-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_LISTEN=0.0.0.0:2525 \
    RELAY_METRICS_LISTEN=0.0.0.0:9925 \
    RELAY_SMTP_ALLOW_NETWORKS=127.0.0.0/8 \
    RELAY_SPOOL_DIR=/var/lib/solo-relay/spool \
    RELAY_LOG_FORMAT=json

WORKDIR /var/lib/solo-relay
VOLUME ["/var/lib/solo-relay/spool"]
USER 10001:10001
EXPOSE 2525 9925

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/solo-relay/bin/python", "/opt/solo-relay/healthcheck.py"]

# Exec form: the relay is PID 1 and gets SIGTERM itself. It stops accepting,
# lets SMTP sessions finish (up to 30 s), gives deliveries in flight
# delivery.drain_grace (30 s), and leaves the rest in the spool. Give it more
# than 60 s: docker run/stop --stop-timeout 75, compose stop_grace_period: 75s
# (Docker's default is 10 s, then SIGKILL; the spool survives that too, but a
# copy cut after its final dot may be sent twice).
STOPSIGNAL SIGTERM
ENTRYPOINT ["solo-relay"]
CMD ["serve"]
