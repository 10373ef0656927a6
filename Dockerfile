# mailbridge container image: a static-looking runtime (the binary, glibc,
# CA roots, a non-root user) on an empty base, built with the official
# Rust image. `docker build -t mailbridge .` or `buildah bud -t mailbridge .`
#
# Configuration: /etc/mailbridge/config.toml if present, and every key as a
# MAILBRIDGE_<TABLE>__<KEY> environment variable (README: "Configuration
# from the environment"). The spool is the volume /var/spool/mailbridge.

FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches are kept between builds (BuildKit, buildah).
# The copied sources may carry mtimes older than the cached build: touch
# them so mailbridge itself is always compiled (dependencies stay cached).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    find src -type f -exec touch {} + \
 && CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --release --locked --bin mailbridge \
 && install -D -m 0755 target/release/mailbridge /rootfs/usr/local/bin/mailbridge
# The runtime tree: the shared libraries the binary links, CA roots, the
# user (uid 10001) and the directories it owns.
RUN set -eu; \
    for lib in $(ldd /rootfs/usr/local/bin/mailbridge | grep -o '/[^ ]*'); do \
      install -D -m 0755 "$(readlink -f "$lib")" "/rootfs$lib"; \
    done; \
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nmailbridge:x:10001:10001:mailbridge:/var/spool/mailbridge:/sbin/nologin\n' > /rootfs/etc/passwd; \
    printf 'root:x:0:\nmailbridge:x:10001:\n' > /rootfs/etc/group; \
    printf 'hosts: files dns\n' > /rootfs/etc/nsswitch.conf; \
    install -d -m 0755 /rootfs/etc/mailbridge; \
    install -d -m 0700 -o 10001 -g 10001 /rootfs/var/spool/mailbridge; \
    install -d -m 1777 /rootfs/tmp; \
    ln -s mailbridge /rootfs/usr/local/bin/sendmail; \
    # Port 25 without root: the file capability (keep NET_BIND_SERVICE in
    # the container's capability set; see README for the alternatives).
    setcap cap_net_bind_service=+ep /rootfs/usr/local/bin/mailbridge

FROM scratch
COPY --from=build /rootfs /
ENV PATH=/usr/local/bin \
    MAILBRIDGE_CONFIG=/etc/mailbridge/config.toml \
    MAILBRIDGE_SPOOL__PATH=/var/spool/mailbridge \
    MAILBRIDGE_LISTEN__ADDRESS=127.0.0.1:25 \
    MAILBRIDGE_ADMIN__ADDRESS=127.0.0.1:8025
USER 10001:10001
WORKDIR /var/spool/mailbridge
VOLUME /var/spool/mailbridge
EXPOSE 25 8025
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["mailbridge", "health"]
ENTRYPOINT ["mailbridge"]
CMD ["run"]
