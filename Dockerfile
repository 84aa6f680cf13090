# syntax=docker/dockerfile:1
# Thingsgate in a container: a Rust builder stage running CI's release build (`.ci/run`; a test,
# tests/tests/docker_files.rs, keeps the two commands identical), then a small Debian runtime
# with only the binary and CA certificates (for `jwks_url` issuers over https).
#
#   docker build -t thingsgate .
#   docker run --rm -v thingsgate-data:/data thingsgate solution create --data /data --namespace org.acme --json
#   docker run --rm -p 1883:1883 -p 8080:8080 -v thingsgate-data:/data thingsgate
#
# or `docker compose up` (docker-compose.yml). Configuration: docs/configuration.md (a config
# file mounted and passed with `--config`, or THINGSGATE_… environment variables).

FROM rust:1.95-bookworm AS builder
WORKDIR /build
COPY . .
# The cache mounts keep the registry and build artifacts between builds (BuildKit); the binary is
# copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked -p broker --bin thingsgate \
    && cp target/release/thingsgate /usr/local/bin/thingsgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin thingsgate \
    && mkdir /data \
    && chown thingsgate:thingsgate /data
COPY --from=builder /usr/local/bin/thingsgate /usr/local/bin/thingsgate
USER thingsgate
# The data directory: twins, policies, solutions, the journal. Keep it on a volume.
VOLUME ["/data"]
WORKDIR /data
# 1883 MQTT (`--mqtt`), 8883 MQTT over TLS (`--mqtts`, needs `tls_cert_file`/`tls_key_file` in
# the config), 5672 AMQP 0.9.1 (`--amqp`; `--amqps` takes the same TLS files), 8080 HTTP
# (`--http`: the API under /api/2, /metrics, /health, /ready).
EXPOSE 1883 8883 5672 8080
# SIGTERM (docker stop) shuts down gracefully: connections closed, journal flushed last.
ENTRYPOINT ["thingsgate"]
CMD ["serve", "--data", "/data", "--mqtt", "0.0.0.0:1883", "--amqp", "0.0.0.0:5672", "--http", "0.0.0.0:8080"]
