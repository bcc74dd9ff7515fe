# xks-proxy container image (see packaging/README.md).
#
#   docker build -t xks-proxy .
#   docker run --rm -p 8443:8443 xks-proxy                                   # SoftHSM demo
#   docker run --rm -p 443:8443 -v /srv/xks:/etc/xks-proxy:ro -e XKS_HSM_PIN xks-proxy
#
# Plain Dockerfile syntax (no BuildKit-only features), so the legacy builder works too.

# ---- build ----
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against a stub src/: a source change does not rebuild them. Cargo reads
# the manifest's [[bench]] targets, so benches/ comes along (it is not built); copy any other
# directory the manifest names a target in as well (and let it through .dockerignore). The
# workspace's other member, the PKCS#11 emulator (a test tool), comes along for the manifest only:
# `cargo build` at the root builds the proxy alone.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY pkcs11-emulator ./pkcs11-emulator
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
# touch: the copied files may be older than the stub build's fingerprints.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -m 0755 target/release/xks-proxy /usr/local/bin/xks-proxy

# ---- runtime ----
FROM debian:bookworm-slim

# softhsm2 + opensc (pkcs11-tool) + python3: the demo token (hsm-config/create-softhsm-token.sh).
# A production image adds the HSM vendor's PKCS#11 client library instead (FROM this image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 opensc python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 xks-proxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/xks-proxy --no-create-home \
      --shell /usr/sbin/nologin xks-proxy \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/xks-proxy \
 && install -d -m 0755 /etc/xks-proxy

COPY --from=build /usr/local/bin/xks-proxy /usr/local/bin/xks-proxy
COPY hsm-config/ /usr/share/xks-proxy/hsm-config/
COPY packaging/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh /usr/share/xks-proxy/hsm-config/*.sh \
      /usr/share/xks-proxy/hsm-config/*.py \
 && xks-proxy --version

LABEL org.opencontainers.image.title="xks-proxy" \
      org.opencontainers.image.description="AWS KMS External Key Store (XKS) proxy"

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/xks-proxy
EXPOSE 8443
# SIGTERM: stop accepting, let in-flight requests finish (10 s grace): docker stop -t 15.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
