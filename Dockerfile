# syntax=docker/dockerfile:1
#
# One image for the whole saga engine. It holds every service binary (the
# orchestrator and each participant of participants/src/bin, by the name the saga
# definitions give it) and sagactl in /usr/local/bin, and has no ENTRYPOINT, so the
# command picks the service: docker-compose.yml builds this image once (tagged
# saga-engine:local) and runs it once per service with `command: orchestrator`,
# `command: inventory`, and so on. Plain docker works the same way:
#
#   docker build -t saga-engine:local .
#   docker run --rm -e KAFKA_BROKERS=... -e DATABASE_URL=... saga-engine:local payment
#
# Configuration is by environment variables only (KAFKA_BROKERS, DATABASE_URL,
# TOPIC_PREFIX, ...). Each service creates its own PostgreSQL schema, runs its
# migrations (embedded in the binary at compile time) and creates its Kafka
# topics at start-up. Besides the binaries the image holds the saga definitions
# (sagas/*.toml) in /etc/saga-engine/sagas, which the orchestrator reads at
# start-up (SAGAS_DIR); mount another folder there to deploy other definitions.

############################ build ############################
FROM rust:1.95-bookworm AS builder

# rdkafka builds its bundled librdkafka from source (C toolchain, make, perl,
# python3, zlib headers; pkg-config finds the system zlib and OpenSSL, whose
# headers librdkafka's TLS and SASL support is built against).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential \
        cmake \
        libssl-dev \
        perl \
        pkg-config \
        python3 \
        zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

COPY Cargo.toml Cargo.lock ./
COPY events events
COPY saga-core saga-core
COPY kafka-record kafka-record
COPY messaging messaging
COPY orchestrator-schema orchestrator-schema
COPY orchestrator orchestrator
COPY participant-sdk participant-sdk
COPY participants participants
# A workspace member: cargo reads every member's manifest, whichever binary it builds.
COPY sagactl sagactl
# The test kit, a dev-dependency only, is a member too.
COPY testkit testkit
# sqlx::migrate!("../migrations/...") embeds these at compile time.
COPY migrations migrations
# sqlx's query macros check the SQL against this cache instead of a database
# (.cargo/config.toml sets SQLX_OFFLINE; scripts/sqlx-prepare.sh writes .sqlx/).
COPY .cargo .cargo
COPY .sqlx .sqlx

# The cache mounts keep the crate registry and the target directory between
# builds (BuildKit), so a source change does not rebuild every dependency.
# Because target/ is a cache mount, the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
        --package orchestrator --package participants --package sagactl \
    && mkdir -p /out \
    && cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json, sys; print("\n".join(t["name"] for p in json.load(sys.stdin)["packages"] if p["name"] in ("orchestrator", "participants", "sagactl") for t in p["targets"] if "bin" in t["kind"]))' \
        | while read -r binary; do cp "target/release/$binary" /out/; done \
    && test -x /out/orchestrator && test -x /out/sagactl

############################ runtime ############################
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 saga \
    && useradd --system --uid 10001 --gid saga --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin saga

# sagactl too: the secured setup's admin step (docker-compose.secured.yml) runs its
# provision-kafka.
COPY --from=builder /out/ /usr/local/bin/
COPY sagas /etc/saga-engine/sagas
ENV SAGAS_DIR=/etc/saga-engine/sagas

# The orchestrator's status API defaults to 127.0.0.1:8080, which is unreachable
# from outside a container; listen on all interfaces instead.
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080

USER 10001:10001

# Overridden per service; see the comment at the top.
CMD ["orchestrator"]
