# Meridian region image: `meridian` (server) and `meridianctl` (client) on Debian slim, non-root.
#
#   docker build -t meridian:local .
#   docker run -v $PWD/regions/us-east.toml:/etc/meridian/meridian.toml:ro -p 7001:7001 meridian:local
#
# The entrypoint is `meridian serve`; it reads the config named by MERIDIAN_CONFIG and every
# field can be overridden by env MERIDIAN_<FIELD>. The health check probes port 7001: keep
# `listen` on that port (or change the HEALTHCHECK) when overriding it.

ARG RUST_VERSION=1.95

# ---- build ----------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts (BuildKit) keep downloaded crates and compiled dependencies between builds;
# the binaries are copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p meridian-region -p meridian-cli \
 && install -m 0755 target/release/meridian target/release/meridianctl /usr/local/bin/

# ---- runtime --------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 meridian \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/meridian --no-create-home \
        --shell /usr/sbin/nologin meridian \
 && mkdir -p /etc/meridian /var/lib/meridian \
 && chown meridian:meridian /var/lib/meridian
COPY --from=build /usr/local/bin/meridian /usr/local/bin/meridianctl /usr/local/bin/

ENV MERIDIAN_CONFIG=/etc/meridian/meridian.toml
# data_dir: holds meridian.redb. A new named volume inherits the meridian user's ownership.
VOLUME /var/lib/meridian
EXPOSE 7001
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:7001/readyz || exit 1
# SIGTERM is a graceful stop: in-flight requests finish before the process exits.
STOPSIGNAL SIGTERM
USER meridian
WORKDIR /var/lib/meridian
ENTRYPOINT ["meridian", "serve"]
